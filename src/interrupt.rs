//! A clean stop on SIGTERM or SIGINT (a Slurm preemption, a sweep stopped, Ctrl-C): the signal
//! only raises a flag; the stages' loops check it between steps, save what they can resume
//! from, and return an error that says how to resume.

use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    REQUESTED.store(true, Ordering::SeqCst);
}

/// Catches SIGTERM and SIGINT from now on.
pub fn install() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
}

/// An error if a stop was requested.
pub fn check() -> anyhow::Result<()> {
    if REQUESTED.load(Ordering::SeqCst) {
        anyhow::bail!("stopped by a signal at a clean point\n  hint: run the same command again to resume");
    }
    Ok(())
}

/// Makes the calling process receive SIGTERM when its parent dies, so that the `runner run`
/// workers of a killed `runner sweep` stop too. Call in the child between fork and exec.
pub fn die_with_parent() -> std::io::Result<()> {
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number and has no memory effects.
    #[cfg(target_os = "linux")]
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
