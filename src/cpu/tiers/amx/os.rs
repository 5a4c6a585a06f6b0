//! Whether this process may run tile instructions: CPUID, XCR0, and (Linux) the kernel's leave to
//! use tile data, asked once.

use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

/// Whether this process may run tile instructions: the CPU has AMX-BF16 and AMX-TILE, the OS
/// saves tile state (XCR0 bits 17-18), and (Linux) granted this process tile data. Asked once;
/// `Err` says why not.
pub(crate) fn usable() -> Result<(), &'static str> {
    static USABLE: OnceLock<Result<(), &'static str>> = OnceLock::new();
    *USABLE.get_or_init(check)
}

/// Miri cannot run `cpuid` or `syscall` (inline assembly).
#[cfg(miri)]
fn check() -> Result<(), &'static str> {
    Err("not under Miri")
}

#[cfg(not(miri))]
fn check() -> Result<(), &'static str> {
    // SAFETY: cpuid runs on every x86-64 CPU; a leaf above the maximum returns unrelated values,
    // which the check of leaf 0's maximum below discards.
    #[allow(unused_unsafe)]
    let (max, leaf1, leaf7) = unsafe { (__cpuid(0).eax, __cpuid(1), __cpuid_count(7, 0)) };
    if max < 7 || leaf7.edx & (1 << 22) == 0 || leaf7.edx & (1 << 24) == 0 {
        return Err("this CPU has no AMX-BF16");
    }
    if leaf1.ecx & (1 << 27) == 0 {
        return Err("the OS has not enabled XSAVE");
    }
    // SAFETY: OSXSAVE (checked above) means XGETBV is available; XCR0 is register 0.
    let xcr0 = unsafe { xgetbv0() };
    if xcr0 & (0b11 << 17) != 0b11 << 17 {
        return Err("the OS does not save AMX tile state (XCR0)");
    }
    request_tile_data()
}

/// XCR0, read with XGETBV.
///
/// # Safety
/// CPUID.1:ECX.OSXSAVE is set.
#[cfg(not(miri))]
unsafe fn xgetbv0() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: XGETBV with ECX = 0 reads XCR0 (the caller checked OSXSAVE); it touches no memory.
    unsafe { asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Asks Linux for this process's leave to use AMX tile data: `arch_prctl(ARCH_REQ_XCOMP_PERM,
/// XFEATURE_XTILEDATA)`. The permission is the process's (every thread, present and future),
/// so once is enough.
#[cfg(all(target_os = "linux", not(miri)))]
fn request_tile_data() -> Result<(), &'static str> {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let ret: i64;
    // SAFETY: the arch_prctl system call with this request reads and writes no user memory; the
    // syscall instruction clobbers rcx and r11 only.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    if ret == 0 {
        Ok(())
    } else {
        Err("Linux refused this process AMX tile data (arch_prctl ARCH_REQ_XCOMP_PERM)")
    }
}

/// Other systems: tiles are not used (untested there).
#[cfg(all(not(target_os = "linux"), not(miri)))]
fn request_tile_data() -> Result<(), &'static str> {
    Err("AMX is only used on Linux")
}
