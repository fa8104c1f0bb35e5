#!/usr/bin/env bash
# Builds the lab's tiny guest: a Debian cloud kernel and a gzip newc initramfs holding
# busybox, a real qemu-ga, chpasswd + PAM, three users and an /init that the kernel
# command line steers (gc.agent=on|off|hung, gc.block=cmd1,cmd2, gc.os=ID).
#
# Usage: build-guest.sh CACHE_DIR
# Writes CACHE_DIR/guest/{vmlinuz,initrd.gz,stamp}. Rebuilds only when the stamp (hash of
# this script, the kernel package and the versions of the copied host packages) changed.
# Needs root (file ownership inside the archive) and the packages from install-deps.sh.
set -euo pipefail

cache=${1:?usage: build-guest.sh CACHE_DIR}
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)
out="$cache/guest"
dl="$cache/dl"
mkdir -p "$out" "$dl"

die() { echo "build-guest: $*" >&2; exit 1; }
for tool in busybox qemu-ga chpasswd ldd dpkg-deb apt-get apt-cache gzip sha256sum; do
    command -v "$tool" >/dev/null 2>&1 || die "missing '$tool': run scripts/install-deps.sh"
done
pamdir=/lib/x86_64-linux-gnu/security
for mod in pam_unix.so pam_deny.so pam_permit.so; do
    [[ -e $pamdir/$mod ]] || die "missing $pamdir/$mod: run scripts/install-deps.sh"
done

kernel_pkg() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null |
        awk '/Depends: linux-image-[0-9]/ { print $2; exit }'
}
# Resolving the package takes ~1 s; reuse the answer until the apt lists change.
lists_key=$(stat -c %Y /var/lib/apt/lists 2>/dev/null || echo none)
kpkg=
if [[ -f $cache/kernel-pkg && $(head -n1 "$cache/kernel-pkg") == "$lists_key" ]]; then
    kpkg=$(sed -n 2p "$cache/kernel-pkg")
fi
if [[ -z $kpkg ]]; then
    kpkg=$(kernel_pkg || true)
fi
if [[ -z $kpkg ]]; then
    apt-get update >/dev/null
    lists_key=$(stat -c %Y /var/lib/apt/lists 2>/dev/null || echo none)
    kpkg=$(kernel_pkg || true)
fi
[[ -n $kpkg ]] || die "cannot resolve linux-image-cloud-amd64 (apt-get update failed?)"
printf '%s\n%s\n' "$lists_key" "$kpkg" >"$cache/kernel-pkg"
kver=${kpkg#linux-image-}

stamp=$(
    {
        sha256sum "$0" | cut -d' ' -f1
        echo "$kpkg"
        dpkg-query -W qemu-guest-agent busybox-static passwd libpam-modules libc6 \
            libglib2.0-0 2>/dev/null || true
    } | sha256sum | cut -d' ' -f1
)
if [[ -f $out/stamp && $(cat "$out/stamp") == "$stamp" && -f $out/vmlinuz && -f $out/initrd.gz ]]; then
    echo "build-guest: up to date ($kpkg)"
    exit 0
fi
echo "build-guest: building guest image with $kpkg"

work=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf "$work"' EXIT

# --- kernel -----------------------------------------------------------------
deb=$(ls "$dl/${kpkg}"_*.deb 2>/dev/null | head -n1 || true)
if [[ -z $deb ]]; then
    (cd "$dl" && apt-get download "$kpkg") || die "apt-get download $kpkg failed"
    deb=$(ls "$dl/${kpkg}"_*.deb | head -n1)
fi
dpkg-deb -x "$deb" "$work/kernel"
vmlinuz="$work/kernel/boot/vmlinuz-$kver"
[[ -f $vmlinuz ]] || die "no vmlinuz in $deb"
moddir="$work/kernel/lib/modules/$kver"

# --- initramfs tree ---------------------------------------------------------
root="$work/root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc/pam.d,proc,sys,dev,run,tmp,root,home/alice,lib/modules,lib64,seed,var}
ln -s ../run "$root/var/run"
chmod 1777 "$root/tmp"
chmod 0700 "$root/root"

cp "$(command -v busybox)" "$root/bin/busybox"
for applet in $(busybox --list); do
    # chpasswd must be shadow's (qemu-ga pipes "user:password" to it through PAM).
    [[ $applet == busybox || $applet == chpasswd ]] && continue
    ln -s busybox "$root/bin/$applet"
done
cp "$(command -v qemu-ga)" "$(command -v chpasswd)" "$root/usr/sbin/"
mkdir -p "$root$pamdir"
cp "$pamdir/pam_unix.so" "$pamdir/pam_deny.so" "$pamdir/pam_permit.so" "$root$pamdir/"

# Shared libraries: whatever ldd says the binaries and PAM modules need.
for bin in "$(command -v qemu-ga)" "$(command -v chpasswd)" "$pamdir"/pam_unix.so "$pamdir"/pam_deny.so \
    "$pamdir"/pam_permit.so; do
    ldd "$bin" | awk '/=> \// { print $3 } /^\t\/lib64\// { print $1 }'
done | sort -u | while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done
[[ -e $root/lib64/ld-linux-x86-64.so.2 ]] || cp -L /lib64/ld-linux-x86-64.so.2 "$root/lib64/"

for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_console; do
    ko=$(find "$moddir" -name "$m.ko" | head -n1)
    [[ -n $ko ]] || die "module $m.ko not found in $kpkg"
    cp "$ko" "$root/lib/modules/"
done

cat >"$root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/bin/sh
alice:x:1000:1000:Alice:/home/alice:/bin/sh
nohome:x:1001:1001:No Home:/home/nohome:/bin/sh
PASSWD
cat >"$root/etc/group" <<'GROUP'
root:x:0:
alice:x:1000:
nohome:x:1001:
GROUP
cat >"$root/etc/shadow" <<'SHADOW'
root:*:19000:0:99999:7:::
alice:!:19000:0:99999:7:::
nohome:!:19000:0:99999:7:::
SHADOW
chmod 0640 "$root/etc/shadow"
chown 1000:1000 "$root/home/alice"
chmod 0755 "$root/home/alice"
# lab1..lab8: spare users with homes, so tests sharing a guest need not share a user.
for i in 1 2 3 4 5 6 7 8; do
    id=$((2000 + i))
    echo "lab$i:x:$id:$id:Lab user $i:/home/lab$i:/bin/sh" >>"$root/etc/passwd"
    echo "lab$i:x:$id:" >>"$root/etc/group"
    echo "lab$i:!:19000:0:99999:7:::" >>"$root/etc/shadow"
    mkdir -p "$root/home/lab$i"
    chown "$id:$id" "$root/home/lab$i"
done
cat >"$root/etc/pam.d/chpasswd" <<'PAM'
@include common-password
PAM
cat >"$root/etc/pam.d/common-password" <<'PAM'
password	[success=1 default=ignore]	pam_unix.so obscure yescrypt
password	requisite			pam_deny.so
password	required			pam_permit.so
PAM
cat >"$root/etc/os-release" <<'OS'
ID=guestcred-lab
NAME="guestcred lab guest"
PRETTY_NAME="guestcred lab guest"
VERSION_ID=1
OS
echo "guestcred-lab" >"$root/etc/hostname"

cat >"$root/init" <<'INIT'
#!/bin/sh
# guestcred lab guest. Kernel command line: gc.agent=on|off|hung (default on),
# gc.block=cmd1,cmd2 (qemu-ga -b), gc.os=ID (/etc/os-release). A seed archive appended to
# the initramfs may hold /seed/authorized_keys/<user>, /seed/hostname, /seed/instance-id.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
log() { echo "gc: $*" >/dev/console; }

agent=on block= os=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        gc.agent=*) agent=${arg#gc.agent=} ;;
        gc.block=*) block=${arg#gc.block=} ;;
        gc.os=*) os=${arg#gc.os=} ;;
    esac
done

[ -f /seed/hostname ] && cp /seed/hostname /etc/hostname
hostname "$(cat /etc/hostname)"
if [ -n "$os" ]; then
    printf 'ID=%s\nNAME="%s"\nPRETTY_NAME="%s"\nVERSION_ID=1\n' "$os" "$os" "$os" >/etc/os-release
fi

# Cloud-init stand-in: install seeded keys before the agent can be asked about them.
for f in /seed/authorized_keys/*; do
    [ -f "$f" ] || continue
    user=${f##*/}
    entry=$(grep "^$user:" /etc/passwd) || { log "seed: no user $user"; continue; }
    uid=$(echo "$entry" | cut -d: -f3)
    gid=$(echo "$entry" | cut -d: -f4)
    home=$(echo "$entry" | cut -d: -f6)
    [ -d "$home" ] || { log "seed: home $home of $user missing, keys skipped"; continue; }
    mkdir -p "$home/.ssh"
    cp "$f" "$home/.ssh/authorized_keys"
    chmod 0700 "$home/.ssh"
    chmod 0600 "$home/.ssh/authorized_keys"
    chown "$uid:$gid" "$home/.ssh" "$home/.ssh/authorized_keys"
    log "seed: keys installed for $user"
done

for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_console; do
    insmod "/lib/modules/$m.ko" || log "insmod $m failed"
done

port=/dev/virtio-ports/org.qemu.guest_agent.0
mkdir -p /dev/virtio-ports
i=0
while [ ! -e "$port" ] && [ $i -lt 100 ]; do
    for p in /sys/class/virtio-ports/*; do
        [ -f "$p/name" ] || continue
        ln -sf "../${p##*/}" "/dev/virtio-ports/$(cat "$p/name")"
    done
    [ -e "$port" ] || sleep 0.1
    i=$((i + 1))
done
[ -e "$port" ] || log "no agent port $port"

case "$agent" in
    on)
        set -- -m virtio-serial -p "$port"
        [ -n "$block" ] && set -- "$@" -b "$block"
        # Keep the agent up: restart it if it dies.
        ( while true; do qemu-ga "$@"; log "qemu-ga exited ($?), restarting"; sleep 1; done ) &
        ;;
    hung)
        # Hold the port open (libvirt sees an agent) but never read or answer. Reading
        # would see EOF while the host side is unconnected and flap the port.
        ( exec 3<"$port"; while true; do sleep 3600; done ) &
        ;;
    off) ;;
    *) log "unknown gc.agent=$agent, no agent started" ;;
esac
log "ready agent=$agent block=$block"
while true; do sleep 3600; done
INIT
chmod 0755 "$root/init"

(cd "$root" && find . | busybox cpio -o -H newc 2>/dev/null) | gzip -1 >"$work/initrd.gz"

cp "$vmlinuz" "$work/vmlinuz"
mv -f "$work/vmlinuz" "$out/vmlinuz"
mv -f "$work/initrd.gz" "$out/initrd.gz"
echo "$stamp" >"$out/stamp"
echo "build-guest: done: $out/vmlinuz $out/initrd.gz"
