//! Keeps the binary's glibc requirement at 2.34 (see README, "Install").
//!
//! The static libstdc++ of GCC 12 seeds `std::random_device` with
//! `arc4random`, which glibc has only since 2.36: linked against this
//! machine's glibc that one symbol would make every older glibc refuse the
//! binary. Defining it here (from `getrandom(2)`, which is what glibc's
//! own does) binds libstdc++'s reference to this definition instead.

/// A uniformly random 32-bit value from the kernel's CSPRNG.
#[no_mangle]
pub extern "C" fn arc4random() -> u32 {
    let mut buf = [0u8; 4];
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: writes at most the rest of `buf`.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n > 0 {
            filled += n as usize;
        } else if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            // arc4random cannot fail; neither may this.
            std::process::abort();
        }
    }
    u32::from_ne_bytes(buf)
}
