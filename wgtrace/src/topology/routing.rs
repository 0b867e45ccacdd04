//! Route questions inside a namespace, asked over the route socket
//! discovery keeps open for it (or, without one, from inside it).

use anyhow::{Context as _, Result};

use super::{model::Topology, netlink, netns};

impl Topology {
    /// Every route of `table` in `netns` for this family (RTM_GETROUTE dump).
    pub fn table_routes(&self, netns: u64, family: u8, table: u32) -> Result<Vec<netlink::TableRoute>> {
        let namespace = self.namespaces.get(&netns).context("namespace vanished")?;
        if let Some(socket) = &namespace.route_socket {
            let mut socket = socket.lock().map_err(|_| anyhow::anyhow!("route socket poisoned"))?;
            return socket.table_routes(family, table);
        }
        let handle = namespace.handle.clone();
        netns::run_in(&handle, move || netlink::Socket::route()?.table_routes(family, table))
    }

    /// Asks the kernel, inside `netns`, where a UDP packet would go.
    pub fn route_get(&self, netns: u64, query: netlink::UdpQuery) -> Result<netlink::RouteAnswer> {
        let namespace = self.namespaces.get(&netns).context("namespace vanished")?;
        if let Some(socket) = &namespace.route_socket {
            let mut socket = socket.lock().map_err(|_| anyhow::anyhow!("route socket poisoned"))?;
            return socket.route_get(&query);
        }
        let handle = namespace.handle.clone();
        netns::run_in(&handle, move || netlink::Socket::route()?.route_get(&query))
    }
}
