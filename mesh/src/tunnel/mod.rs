//! The consumer's tunnels to the VMs it rents: an interface made with root ([`iface`]: the
//! kernel's WireGuard or `wireguard-go` on a TUN device), or kept in this process without any
//! privilege ([`user`]: boringtun and smoltcp).
pub mod iface;
pub mod user;

pub use iface::{collides, free_port, pick_addresses, remove_interface, routes, Tunnel, TunnelError, FIRST_PORT};
