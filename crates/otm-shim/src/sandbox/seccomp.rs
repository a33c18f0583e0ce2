//! The agent sandbox's seccomp filter, as a classic BPF program for `bwrap --seccomp FD`.
//!
//! A denylist on top of the namespaces: calls an agent never needs and that widen the kernel's
//! attack surface or undo the sandbox are answered `EPERM` (`clone3` `ENOSYS`, so C libraries fall
//! back to `clone`, whose flags can be checked):
//! mounts and namespaces (`mount`, `umount2`, the new mount API, `pivot_root`, `chroot`,
//! `unshare`, `setns`, `clone` with any `CLONE_NEW*` flag), other processes' memory (`ptrace`,
//! `process_vm_readv`/`writev`), kernel keyrings, `bpf`, `perf_event_open`, `userfaultfd`,
//! `io_uring`, kexec and modules, the clocks, swap, reboot, `acct`, quotas, file handles,
//! `syslog`; packet and raw sockets; `TIOCSTI` and `TIOCLINUX` (typing into a terminal).
//! Any other architecture than the one otm was built for (and on x86-64 the x32 ABI) is refused.

use nix::libc;

const LD_W_ABS: u16 = 0x20;
const JEQ_K: u16 = 0x15;
const JGE_K: u16 = 0x35;
const JSET_K: u16 = 0x45;
const AND_K: u16 = 0x54;
const RET_K: u16 = 0x06;

const RET_ALLOW: u32 = 0x7fff_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_KILL_PROCESS: u32 = 0x8000_0000;

/// Offsets in `struct seccomp_data`.
const NR: u32 = 0;
const ARCH: u32 = 4;
/// The low 32 bits of argument `n` (little-endian targets).
const fn arg(n: u32) -> u32 {
    16 + 8 * n
}

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7;

/// Calls refused outright.
fn denied() -> Vec<libc::c_long> {
    let mut v = vec![
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_move_mount,
        libc::SYS_open_tree,
        libc::SYS_mount_setattr,
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_userfaultfd,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_clock_settime,
        libc::SYS_clock_adjtime,
        libc::SYS_settimeofday,
        libc::SYS_adjtimex,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_reboot,
        libc::SYS_acct,
        libc::SYS_quotactl,
        libc::SYS_open_by_handle_at,
        libc::SYS_name_to_handle_at,
        libc::SYS_syslog,
        libc::SYS_vhangup,
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([
        libc::SYS_iopl,
        libc::SYS_ioperm,
        libc::SYS_uselib,
        libc::SYS_lookup_dcookie,
    ]);
    v
}

/// `CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID |
/// CLONE_NEWNET | CLONE_NEWTIME`.
const CLONE_NEW_ANY: u32 = 0x0002_0000
    | 0x0200_0000
    | 0x0400_0000
    | 0x0800_0000
    | 0x1000_0000
    | 0x2000_0000
    | 0x4000_0000
    | 0x80;

const AF_PACKET: u32 = 17;
const SOCK_RAW: u32 = 3;
const SOCK_PACKET: u32 = 10;
const TIOCSTI: u32 = 0x5412;
const TIOCLINUX: u32 = 0x541c;

#[derive(Clone, Copy)]
struct Insn {
    code: u16,
    jt: u8,
    jf: u8,
    k: u32,
}

fn stmt(code: u16, k: u32) -> Insn {
    Insn {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> Insn {
    Insn { code, jt, jf, k }
}

/// The filter's instructions, as `struct sock_filter` in native byte order.
pub fn program() -> Vec<u8> {
    let deny = RET_ERRNO | libc::EPERM as u32;
    let mut p: Vec<Insn> = vec![
        stmt(LD_W_ABS, ARCH),
        jump(JEQ_K, AUDIT_ARCH, 1, 0),
        stmt(RET_K, RET_KILL_PROCESS),
        stmt(LD_W_ABS, NR),
    ];
    #[cfg(target_arch = "x86_64")]
    {
        // The x32 ABI numbers its calls from 0x40000000.
        p.push(jump(JGE_K, 0x4000_0000, 0, 1));
        p.push(stmt(RET_K, deny));
    }
    for nr in denied() {
        p.push(jump(JEQ_K, nr as u32, 0, 1));
        p.push(stmt(RET_K, deny));
    }
    p.push(jump(JEQ_K, libc::SYS_clone3 as u32, 0, 1));
    p.push(stmt(RET_K, RET_ERRNO | libc::ENOSYS as u32));

    // clone: namespace flags in the first argument (x86-64 and arm64 alike).
    p.push(jump(JEQ_K, libc::SYS_clone as u32, 0, 4));
    p.push(stmt(LD_W_ABS, arg(0)));
    p.push(jump(JSET_K, CLONE_NEW_ANY, 0, 1));
    p.push(stmt(RET_K, deny));
    p.push(stmt(RET_K, RET_ALLOW));

    // socket: no packet family, no raw or packet sockets of any family.
    p.push(jump(JEQ_K, libc::SYS_socket as u32, 0, 8));
    p.push(stmt(LD_W_ABS, arg(0)));
    p.push(jump(JEQ_K, AF_PACKET, 0, 1));
    p.push(stmt(RET_K, deny));
    p.push(stmt(LD_W_ABS, arg(1)));
    p.push(stmt(AND_K, 0xf));
    p.push(jump(JEQ_K, SOCK_RAW, 1, 0));
    p.push(jump(JEQ_K, SOCK_PACKET, 0, 1));
    p.push(stmt(RET_K, deny));
    // (falls through to the ioctl check, which lets a socket call pass: its nr differs)
    p.push(stmt(LD_W_ABS, NR));

    // ioctl: nothing that types into a terminal.
    p.push(jump(JEQ_K, libc::SYS_ioctl as u32, 0, 4));
    p.push(stmt(LD_W_ABS, arg(1)));
    p.push(jump(JEQ_K, TIOCSTI, 1, 0));
    p.push(jump(JEQ_K, TIOCLINUX, 0, 1));
    p.push(stmt(RET_K, deny));
    p.push(stmt(RET_K, RET_ALLOW));

    let mut out = Vec::with_capacity(p.len() * 8);
    for i in p {
        out.extend_from_slice(&i.code.to_ne_bytes());
        out.push(i.jt);
        out.push(i.jf);
        out.extend_from_slice(&i.k.to_ne_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_program_is_whole_instructions_and_ends_allowing() {
        let p = super::program();
        assert_eq!(p.len() % 8, 0);
        assert!(
            p.len() / 8 < 4096,
            "BPF programs are limited to 4096 instructions"
        );
        let last = &p[p.len() - 8..];
        assert_eq!(u16::from_ne_bytes([last[0], last[1]]), super::RET_K);
        assert_eq!(
            u32::from_ne_bytes([last[4], last[5], last[6], last[7]]),
            super::RET_ALLOW
        );
    }
}
