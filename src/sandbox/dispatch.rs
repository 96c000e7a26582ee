//! A seccomp filter whose dispatch on the system call number is a binary search, not a list.
//!
//! seccompiler compiles a filter to one block per system call, tried in turn, so a call that is not
//! in the list walks every block before it reaches the default action. At install the kernel runs
//! the filter once for every system call number to build its allow cache (kernel/seccomp.c,
//! `seccomp_cache_prepare_bitmap`), so a list of N blocks costs about 450 x N emulated instructions:
//! most of a thread's sandbox time (a vCPU thread's cold install: ~210 µs on a software-KVM host).
//! Here the same blocks sit behind a binary search on the number: about log2(N) jumps per call, at
//! install (~95 µs there) and at every system call after.
//!
//! Written by hand because seccompiler only emits the list; the rules, and each block's code, are
//! still seccompiler's: every block is compiled by it as a one-call filter and cut out.
//!
//! Layout (classic BPF, whose jumps only go forward: Documentation/networking/filter.rst):
//! ```text
//!   arch check | A = nr | search tree | block 0 | RET mismatch | block 1 | RET mismatch | ...
//! ```
//! An inner node is `JGE pivot` (jt: the right subtree; jf: the left one, right after it); a leaf is
//! a `JA` (32-bit offset) to its block. A block is self-contained: entered with A = nr, it returns
//! an action, or falls through when the number is not its call, onto the RET mismatch after it.

use std::collections::BTreeMap;

use seccompiler::{BackendError, BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch, sock_filter};

const BPF_JMP: u16 = 0x05;
const BPF_JA: u16 = 0x00;
const BPF_JGE: u16 = 0x30;
const BPF_K: u16 = 0x00;

/// The most system calls a tree's conditional jumps (8-bit offsets) can span: 2n - 1 instructions.
const MAX_CALLS: usize = 128;

/// `rules` compiled as seccompiler would (`mismatch` for calls not listed or whose rules all fail,
/// `matched` when a rule holds), laid out behind a binary search on the call number. More calls
/// than [`MAX_CALLS`]: seccompiler's own list.
pub fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
    arch: TargetArch,
) -> Result<BpfProgram, BackendError> {
    let filter = |rules| SeccompFilter::new(rules, mismatch.clone(), matched.clone(), arch);
    if rules.len() < 2 || rules.len() > MAX_CALLS {
        return filter(rules)?.try_into();
    }
    // seccompiler's program for no rules is the arch check and one RET: the check's length.
    let arch_check: BpfProgram = filter(BTreeMap::new())?.try_into()?;
    let prefix = arch_check.len() - 1;
    let nrs: Vec<u32> = rules.keys().map(|&n| n as u32).collect();
    // Each call alone: arch check, A = nr, its block, RET mismatch. The block and the RET are kept,
    // and the load of the number once, for the tree.
    let mut blocks = Vec::with_capacity(rules.len());
    let mut load_nr = None;
    for (nr, chain) in rules {
        let mut one: BpfProgram = filter(BTreeMap::from([(nr, chain)]))?.try_into()?;
        blocks.push(one.split_off(prefix + 1));
        load_nr = one.pop();
    }
    let mut program = arch_check[..prefix].to_vec();
    // A = seccomp_data.nr (the instruction right after the arch check in every one-call program).
    program.extend(load_nr);
    let tree_len = 2 * nrs.len() - 1;
    let tree_start = program.len();
    tree(&nrs, &mut program);
    debug_assert_eq!(program.len() - tree_start, tree_len);
    // Point each leaf at its block, now that their places are known.
    let mut block_at = Vec::with_capacity(blocks.len());
    let mut at = tree_start + tree_len;
    for b in &blocks {
        block_at.push(at);
        at += b.len();
    }
    for (i, ins) in program.iter_mut().enumerate().skip(tree_start) {
        if ins.code == BPF_JMP | BPF_JA {
            // The leaf's `k` holds its call's index until here; a JA jumps k instructions past itself.
            ins.k = (block_at[ins.k as usize] - i - 1) as u32;
        }
    }
    for b in blocks {
        program.extend(b);
    }
    Ok(program)
}

/// Appends the search over the sorted numbers `nrs`, in pre-order: 2 * len - 1 instructions. Leaves
/// are `JA` whose `k` is, for now, the index of their call in the whole list.
fn tree(nrs: &[u32], out: &mut BpfProgram) {
    fn build(nrs: &[u32], first: usize, out: &mut BpfProgram) {
        if nrs.len() == 1 {
            out.push(sock_filter { code: BPF_JMP | BPF_JA, jt: 0, jf: 0, k: first as u32 });
            return;
        }
        let mid = nrs.len() / 2;
        let node = out.len();
        // nr >= pivot: the right half; else the left half, which starts at the next instruction.
        out.push(sock_filter { code: BPF_JMP | BPF_JGE | BPF_K, jt: 0, jf: 0, k: nrs[mid] });
        build(&nrs[..mid], first, out);
        // The left subtree has 2 * mid - 1 < 255 instructions (MAX_CALLS).
        out[node].jt = (out.len() - node - 1) as u8;
        build(&nrs[mid..], first + mid, out);
    }
    build(nrs, 0, out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use seccompiler::{SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond};

    /// A classic-BPF interpreter for the instructions seccompiler and this module emit, over a
    /// `struct seccomp_data` (include/uapi/linux/seccomp.h): nr, arch, ip, args[6].
    fn run(prog: &[sock_filter], nr: u32, args: [u64; 6]) -> u32 {
        let mut data = Vec::new();
        data.extend(nr.to_ne_bytes());
        data.extend(0xc000_003eu32.to_ne_bytes()); // AUDIT_ARCH_X86_64
        data.extend(0u64.to_ne_bytes());
        for a in args {
            data.extend(a.to_ne_bytes());
        }
        let (mut a, mut pc) = (0u32, 0usize);
        loop {
            let i = prog[pc].clone();
            pc += 1;
            match i.code {
                0x20 => a = u32::from_ne_bytes(data[i.k as usize..i.k as usize + 4].try_into().unwrap()),
                0x54 => a &= i.k,                                              // ALU AND K
                0x05 => pc += i.k as usize,                                    // JA
                0x15 => pc += if a == i.k { i.jt } else { i.jf } as usize,     // JEQ K
                0x25 => pc += if a > i.k { i.jt } else { i.jf } as usize,      // JGT K
                0x35 => pc += if a >= i.k { i.jt } else { i.jf } as usize,     // JGE K
                0x45 => pc += if a & i.k != 0 { i.jt } else { i.jf } as usize, // JSET K
                0x06 => return i.k,                                            // RET K
                c => panic!("instruction {c:#x} not interpreted"),
            }
        }
    }

    fn sample_rules() -> BTreeMap<i64, Vec<SeccompRule>> {
        let mut m = BTreeMap::new();
        for nr in [0, 1, 3, 9, 10, 16, 60, 202, 231, 257, 435] {
            m.insert(nr, vec![]);
        }
        let eq = |arg, v| Cond::new(arg, Len::Dword, Op::Eq, v).unwrap();
        m.insert(16, (0..40).map(|r| SeccompRule::new(vec![eq(1, 0xae80 + r)]).unwrap()).collect());
        let masked = Cond::new(2, Len::Dword, Op::MaskedEq(4), 0).unwrap();
        m.insert(9, vec![SeccompRule::new(vec![masked]).unwrap()]);
        let qword = Cond::new(0, Len::Qword, Op::Gt, 1 << 33).unwrap();
        m.insert(60, vec![SeccompRule::new(vec![qword, eq(1, 7)]).unwrap()]);
        m
    }

    #[test]
    fn the_tree_decides_every_call_as_the_list_does() {
        let (trap, allow) = (SeccompAction::Trap, SeccompAction::Allow);
        let arch = TargetArch::x86_64;
        let list: BpfProgram =
            SeccompFilter::new(sample_rules(), trap.clone(), allow.clone(), arch).unwrap().try_into().unwrap();
        let tree = compile(sample_rules(), trap, allow, arch).unwrap();
        let argsets = [
            [0; 6],
            [0, 0xae80, 0, 0, 0, 0],
            [0, 0xae80 + 39, 0, 0, 0, 0],
            [0, 0xae80 + 40, 0, 0, 0, 0],
            [0, 0, 4, 0, 0, 0],
            [0, 0, 3, 0, 0, 0],
            [1 << 34, 7, 0, 0, 0, 0],
            [1 << 32, 7, 0, 0, 0, 0],
            [1 << 34, 8, 0, 0, 0, 0],
        ];
        let mut allowed = 0;
        for nr in 0..600 {
            for args in argsets {
                let want = run(&list, nr, args);
                assert_eq!(run(&tree, nr, args), want, "call {nr}, args {args:x?}");
                allowed += usize::from(want == libc::SECCOMP_RET_ALLOW);
            }
        }
        // Not a vacuous comparison: both allow and refuse.
        assert!(allowed > 50 && allowed < 600 * argsets.len() / 2, "{allowed}");
        // The list's blocks, each with its own RET mismatch, behind a tree of 2n - 1 instructions.
        let n = sample_rules().len();
        assert_eq!(tree.len(), list.len() - 1 + (2 * n - 1) + n);
    }

    #[test]
    fn a_wrong_architecture_is_still_killed() {
        let tree = compile(sample_rules(), SeccompAction::Trap, SeccompAction::Allow, TargetArch::x86_64).unwrap();
        let list: BpfProgram =
            SeccompFilter::new(BTreeMap::new(), SeccompAction::Trap, SeccompAction::Allow, TargetArch::x86_64)
                .unwrap()
                .try_into()
                .unwrap();
        assert_eq!(&tree[..list.len() - 1], &list[..list.len() - 1]);
    }
}
