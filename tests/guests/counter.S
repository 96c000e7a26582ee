/*
 * counter: keeps a counter in guest memory and prints it, "count N" per line,
 * with a pause between lines; the state a snapshot must carry over.
 *   spin=N    busy-loop N iterations between lines (default 20000: about 30 ms
 *           under kvm_pvm, where guest code is emulated)
 *   stop=N    after printing count N, print "done" and exit with status 42
 *   touch=N   first write one byte in every 4 KiB page of N MiB from 16 MiB
 *             (guest memory a snapshot then has to save)
 * A restored guest goes on from the count it was snapshotted at: the counter
 * lives in .bss (guest RAM), the loop state in registers (vCPU state).
 */
    .intel_syntax noprefix
    .include "lib.inc"
    .section .text.entry, "ax"
    .globl _start
_start:
    mov r15, rsi
    mov r12, 20000              /* spin */
    lea rdi, [key_spin]
    call after
    test rax, rax
    jz 1f
    mov rdi, rax
    call parse_dec
    mov r12, rax
1:  xor r13, r13                /* stop (0: never) */
    lea rdi, [key_stop]
    call after
    test rax, rax
    jz 4f
    mov rdi, rax
    call parse_dec
    mov r13, rax
4:  lea rdi, [key_touch]
    call after
    test rax, rax
    jz next
    mov rdi, rax
    call parse_dec
    shl rax, 20
    mov rcx, 0x1000000
    lea rdx, [rcx + rax]
5:  cmp rcx, rdx
    jae next
    mov byte ptr [rcx], 1
    add rcx, 4096
    jmp 5b

next:
    inc qword ptr [counter]
    lea rdi, [msg_count]
    call puts
    mov rdi, [counter]
    call putdec
    mov al, '\n'
    call putc
    test r13, r13
    jz 2f
    cmp [counter], r13
    jae finished
2:  mov rcx, r12
3:  dec rcx
    jnz 3b
    jmp next

finished:
    lea rdi, [msg_done]
    call puts
    mov al, 42
    jmp exit

    .section .rodata
key_spin:  .asciz "spin="
key_stop:  .asciz "stop="
key_touch: .asciz "touch="
msg_count: .asciz "count "
msg_done:  .asciz "done\n"

    .section .bss
    .balign 8
counter:   .quad 0
