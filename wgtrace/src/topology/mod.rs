//! What exists on the host: network namespaces, their interfaces and policy
//! rules, and every WireGuard tunnel with its configuration.
//!
//! Userspace implementations (wireguard-go, boringtun) are found through the
//! TUN device they hold open (`/proc/PID/fdinfo` names it) and queried over
//! their UAPI socket in their own mount namespace. Kernel WireGuard devices
//! are recognised by their rtnetlink kind. TUN holders that serve no UAPI
//! (tailscaled and the like) become candidates whose sockets' handshakes
//! can confirm them as tunnels (see [`speakers`]).
//!
//! * `model`: the [`Topology`], its namespaces and tunnels.
//! * `discovery`: the [`Discoverer`] that builds one, round after round,
//!   with `namespace_sockets` (the netlink sockets it keeps per namespace)
//!   and `daemons` (UAPI queries and their backoff).
//! * `routing`: route questions asked inside a namespace.
//! * `prefix`: `ADDR/LEN` prefixes.

pub mod access;
mod daemons;
mod discovery;
pub mod genl;
mod model;
mod namespace_sockets;
pub mod netlink;
pub mod netns;
mod prefix;
mod routing;
pub mod speakers;
pub mod uapi;
pub mod wgquick;

pub use access::Privileged;
pub use discovery::{Discoverer, Scope};
pub use model::{Device, DiscoveredBy, Implementation, Namespace, Peer, Process, Topology, Tunnel};
pub use netns::Netns;
pub use prefix::{parse_prefix, prefix_contains};
