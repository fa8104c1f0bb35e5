//! The only unsafe code in the crate: three libvirt calls that virt 0.5 does not wrap
//! (`virDomainAgentSetResponseTimeout`, `virDomainAuthorizedSSHKeysGet/Set`).
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_char, c_int, c_uint};

use virt::domain::Domain;
use virt::error::Error;
use virt::sys;

/// `virDomainAuthorizedSSHKeysSet` flags: replace the whole file.
pub const SSH_KEYS_REPLACE: u32 = 0;
/// Append keys (duplicates skipped by the agent).
pub const SSH_KEYS_APPEND: u32 = sys::VIR_DOMAIN_AUTHORIZED_SSH_KEYS_SET_APPEND;
/// Remove exactly these keys.
pub const SSH_KEYS_REMOVE: u32 = sys::VIR_DOMAIN_AUTHORIZED_SSH_KEYS_SET_REMOVE;

/// Bound how long libvirt waits for this domain's agent (seconds, > 0).
pub fn set_agent_response_timeout(domain: &Domain, seconds: i32) -> Result<(), Error> {
    // SAFETY: `domain.as_ptr()` is a valid virDomainPtr for as long as `domain` is borrowed;
    // the call neither keeps nor frees it.
    let rc = unsafe { sys::virDomainAgentSetResponseTimeout(domain.as_ptr(), seconds as c_int, 0) };
    if rc < 0 {
        return Err(Error::last_error());
    }
    Ok(())
}

/// The user's authorized keys, in the order the agent reports them.
pub fn authorized_ssh_keys_get(domain: &Domain, user: &str) -> Result<Vec<String>, Error> {
    let user = CString::new(user)?;
    let mut keys: *mut *mut c_char = std::ptr::null_mut();
    // SAFETY: valid domain pointer (borrowed), NUL-terminated user string that outlives the
    // call, and a valid out-pointer. On success libvirt stores a malloc'd array of `rc`
    // malloc'd strings in `keys`, which we own and free below.
    let rc =
        unsafe { sys::virDomainAuthorizedSSHKeysGet(domain.as_ptr(), user.as_ptr(), &mut keys, 0) };
    if rc < 0 {
        return Err(Error::last_error());
    }
    let count = usize::try_from(rc).unwrap_or(0);
    let mut out = Vec::with_capacity(count);
    if keys.is_null() {
        return Ok(out);
    }
    for i in 0..count {
        // SAFETY: `keys` holds `count` entries (libvirt's contract for a non-negative rc);
        // each entry is a NUL-terminated malloc'd string or NULL.
        let entry = unsafe { *keys.add(i) };
        if entry.is_null() {
            continue;
        }
        // SAFETY: `entry` is a valid NUL-terminated string allocated by libvirt; we copy it
        // and then free it exactly once.
        unsafe {
            out.push(CStr::from_ptr(entry).to_string_lossy().into_owned());
            libc::free(entry.cast());
        }
    }
    // SAFETY: the array itself was malloc'd by libvirt; its entries were freed above.
    unsafe { libc::free(keys.cast()) };
    Ok(out)
}

/// Set the user's authorized keys: `flags` is one of the `SSH_KEYS_*` constants.
pub fn authorized_ssh_keys_set(
    domain: &Domain,
    user: &str,
    keys: &[String],
    flags: u32,
) -> Result<(), Error> {
    let user = CString::new(user)?;
    let owned: Vec<CString> = keys
        .iter()
        .map(|k| CString::new(k.as_str()))
        .collect::<Result<_, _>>()?;
    let mut ptrs: Vec<*const c_char> = owned.iter().map(|k| k.as_ptr()).collect();
    // Validation caps a request at a few hundred keys, far below c_uint::MAX.
    let nkeys = ptrs.len() as c_uint;
    let keys_ptr = if ptrs.is_empty() {
        std::ptr::null_mut()
    } else {
        ptrs.as_mut_ptr()
    };
    // SAFETY: valid borrowed domain pointer; `user` and every string in `owned` outlive
    // the call; `ptrs` has exactly `nkeys` valid pointers (or is NULL with nkeys 0, which
    // libvirt accepts for replace-with-nothing). libvirt copies the strings.
    let rc = unsafe {
        sys::virDomainAuthorizedSSHKeysSet(
            domain.as_ptr(),
            user.as_ptr(),
            keys_ptr,
            nkeys,
            flags as c_uint,
        )
    };
    if rc < 0 {
        return Err(Error::last_error());
    }
    Ok(())
}
