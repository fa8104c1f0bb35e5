//! Guests in bulk: a few labelled VMs, each with a real agent, as selector tests want.
use super::NS;
use crate::hostqga::HostQga;
use crate::kubevirt::vm;
use crate::world::World;

/// VM `name` on `node` for each `(name, node)` of `vms`, labelled `key=value`, each with a
/// real agent whose guest has user alice; their agents, in the order of `vms`.
pub async fn labelled_guests<const N: usize>(
    w: &World,
    (key, value): (&str, &str),
    vms: [(&str, &str); N],
) -> [HostQga; N] {
    let mut guests = Vec::with_capacity(N);
    for (name, node) in vms {
        guests.push(w.add_guest(&vm(NS, name, node).label(key, value)).await);
    }
    match guests.try_into() {
        Ok(guests) => guests,
        Err(_) => unreachable!("one agent for each of the {N} VMs"),
    }
}
