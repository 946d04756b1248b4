//! Which provider a VM ID names, for the consumer: a lease is keyed by its VM ID and
//! belongs to the provider that made it. Every member can read a `vm_created` off the wire,
//! so a provider answering with the ID of a VM this consumer already rents (from it or from
//! anyone) would take that lease over, its releases and its tunnel: refused.

/// Whether a provider's answer naming `vm_id` may become a lease, given the provider of the
/// lease that ID already names (if any): the reason when not.
pub fn claim(current: Option<&str>, vm_id: &str) -> Result<(), String> {
    match current {
        None => Ok(()),
        Some(owner) => Err(format!(
            "the provider answered with VM ID {}, which this consumer already rents from {}",
            crate::net::printable(vm_id, 20),
            crate::net::printable(owner, 20)
        )),
    }
}
