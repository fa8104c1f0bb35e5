//! Real-guest lab: libvirtd, QEMU, qemu-ga.
