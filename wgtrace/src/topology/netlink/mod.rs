//! Minimal rtnetlink: links, policy rules, and "where would this packet go"
//! (RTM_GETROUTE). Only what wgtrace needs, parsed defensively: a truncated
//! or odd message ends parsing of that message, never the program.
//!
//! * `socket`: the socket and its bounded request/answer exchange.
//! * `wire`: message framing and attributes.
//! * `links`, `rules`, `routes`: each dump or question and its parsing.
//! * `diag`: sock_diag listings of bound UDP sockets.
//! * `changes`: link and rule change notifications.

mod changes;
mod diag;
mod links;
mod routes;
mod rules;
mod socket;
mod wire;

pub use changes::{CHANGE_GROUPS, drain, subscribe};
pub use diag::{BoundUdp, parse_bound_udp};
pub use links::{Link, parse_link};
pub use routes::{RouteAnswer, TableRoute, UdpQuery, parse_route_answer, parse_table_route};
pub use rules::{FR_ACT_TO_TBL, Rule, parse_rule, table_name};
pub(crate) use socket::NLM_F_DUMP;
pub use socket::{DEADLINE, MAX_ANSWER, NETLINK_GENERIC, NETLINK_ROUTE, NETLINK_SOCK_DIAG, Socket, open_raw};
pub(crate) use wire::push_attribute;
pub use wire::{AF_INET, AF_INET6, attributes, split_messages};
