/*
 * smp: the boot vCPU starts every other vCPU the way Linux does (Intel SDM
 * vol. 3, 9.4.4 "MP Initialization Example"; MultiProcessor Spec B.4):
 *
 *  1. copy a real-mode trampoline to TRAMPOLINE (0x10000: free RAM in ember's
 *     layout, page aligned, below 1 MiB);
 *  2. software-enable the local APIC (SVR), send INIT, then SIPI twice with
 *     vector TRAMPOLINE >> 12 through the xAPIC ICR: to "all excluding self",
 *     or with `targeted` on the command line to each APIC id 1..N-1 in turn
 *     (INIT assert, INIT deassert, SIPI, SIPI: Linux's sequence);
 *  3. each AP wakes in real mode at CS:IP = 0x1000:0000, loads ember's GDT
 *     (0x500: 0x08 code32, 0x10 code64, 0x18 data), enters protected mode,
 *     turns on PAE + EFER.LME + paging with ember's page tables (CR3 = 0x9000)
 *     and far-jumps to 64-bit code; there it reads its APIC id (LAPIC ID
 *     register >> 24), stores it in a slot it takes with `lock xadd`, counts
 *     itself online with `lock inc` and halts (the in-kernel LAPIC parks it);
 *  4. the BSP waits for `cpus=N` - 1 APs, a bounded wait: each round reads
 *     port 0x80 (an exit to ember, ~1-20 us: a clock that needs no timer);
 *     `wait=R` sets the number of rounds.
 *
 * Output: "cpus online: N" and one "apic id: X" line per vCPU, then status 0.
 * On timeout: "FAIL: ..." with how many APs reached each stage (real mode,
 * protected mode, long mode), so a hang says where it stopped; status 1.
 */
    .intel_syntax noprefix
    .include "lib.inc"
    .include "lapic.inc"            /* APIC registers, ICR fields, TRAMPOLINE */
    .set BOOT_GDT, 0x500
    .set BOOT_GDT_LIMIT, 5 * 8 - 1
    .set PML4, 0x9000
    .set MSR_EFER, 0xc0000080
    .set EFER_LME, 0x100
    .set WAIT_ROUNDS, 400000                /* port reads before giving up: ~7 s under
                                               kvm_pvm (~18 us each), ~1 s on hardware */

    .section .text.entry, "ax"
    .globl _start
_start:
    mov r15, rsi
    mov r14d, APIC_BASE         /* kept in R14: above 2 GiB, no disp32 reaches it */
    mov ebx, 2                  /* expected vCPUs: cpus=N, default 2 */
    lea rdi, [key_cpus]
    call after
    test rax, rax
    jz 1f
    mov rdi, rax
    call parse_dec
    mov rbx, rax
1:  mov dword ptr [wait_rounds], WAIT_ROUNDS
    lea rdi, [key_wait]         /* wait=N overrides the default wait */
    call after
    test rax, rax
    jz 1f
    mov rdi, rax
    call parse_dec
    mov [wait_rounds], eax
1:
    /* 1. The trampoline, to where the SIPI vector points. */
    lea rsi, [trampoline]
    mov edi, TRAMPOLINE
    mov ecx, trampoline_end - trampoline
2:  mov al, [rsi]
    mov [rdi], al
    inc rsi
    inc rdi
    dec ecx
    jnz 2b

    /* The BSP's own APIC id is slot 0. */
    mov eax, [r14 + APIC_ID]
    shr eax, 24
    mov [apic_ids], eax
    mov dword ptr [next_slot], 1

    /* 2. INIT, then SIPI twice: to all the others at once, or (cmdline
     * `targeted`) one AP at a time by APIC id, INIT asserted then deasserted,
     * as Linux's wakeup_secondary_cpu_via_init() does. */
    mov eax, [r14 + APIC_SVR]
    or eax, APIC_SVR_ENABLE
    mov [r14 + APIC_SVR], eax
    lea rdi, [key_targeted]
    call after
    test rax, rax
    jnz targeted

    mov dword ptr [r14 + APIC_ICR_HIGH], 0
    mov dword ptr [r14 + APIC_ICR_LOW], ICR_ALL_BUT_SELF | ICR_LEVEL_ASSERT | ICR_INIT
    call icr_wait
    mov ecx, 100                /* ~1 ms (10 us per port read under kvm_pvm) */
    call delay
    mov eax, ICR_ALL_BUT_SELF | ICR_LEVEL_ASSERT | ICR_STARTUP | (TRAMPOLINE >> 12)
    call sipi_twice
    jmp wait_aps

targeted:
    mov r13d, 1                 /* APIC ids 1 .. N-1 (ember: APIC id = vCPU index) */
1:  cmp r13, rbx
    jae wait_aps
    mov eax, r13d
    shl eax, 24
    mov [r14 + APIC_ICR_HIGH], eax
    mov dword ptr [r14 + APIC_ICR_LOW], ICR_LEVEL_TRIGGER | ICR_LEVEL_ASSERT | ICR_INIT
    call icr_wait
    mov dword ptr [r14 + APIC_ICR_LOW], ICR_LEVEL_TRIGGER | ICR_INIT
    call icr_wait
    mov ecx, 100
    call delay
    mov eax, ICR_STARTUP | (TRAMPOLINE >> 12)
    call sipi_twice
    inc r13
    jmp 1b

wait_aps:
    /* 4. Wait for N - 1 APs. */
    lea r12, [rbx - 1]
    mov ecx, [wait_rounds]
3:  mov eax, [aps_online]
    cmp rax, r12
    jae 4f
    in al, 0x80
    dec ecx
    jnz 3b

    lea rdi, [msg_fail]
    call puts
    mov edi, [aps_online]
    call putdec
    lea rdi, [msg_of]
    call puts
    lea rdi, [r12]
    call putdec
    lea rdi, [msg_stages]
    call puts
    mov edi, [TRAMPOLINE + stage_real - trampoline]
    call putdec
    lea rdi, [msg_prot]
    call puts
    mov edi, [TRAMPOLINE + stage_prot - trampoline]
    call putdec
    lea rdi, [msg_long]
    call puts
    mov edi, [TRAMPOLINE + stage_long - trampoline]
    call putdec
    mov al, '\n'
    call putc
    mov al, 1
    jmp exit

4:  lea rdi, [msg_online]
    call puts
    mov edi, [aps_online]
    inc edi
    call putdec
    mov al, '\n'
    call putc
    xor ebx, ebx
5:  lea rdi, [msg_apic]
    call puts
    mov edi, [apic_ids + rbx * 4]
    call putdec
    mov al, '\n'
    call putc
    inc ebx
    cmp ebx, [next_slot]
    jb 5b
    xor eax, eax
    jmp exit

/* icr_wait: spin until the ICR's delivery-status bit clears. */
icr_wait:
1:  mov eax, [r14 + APIC_ICR_LOW]
    test eax, APIC_ICR_BUSY
    jnz 1b
    ret

/* sipi_twice: write EAX to the ICR twice, 200 us apart (MP spec B.4). */
sipi_twice:
    mov [r14 + APIC_ICR_LOW], eax
    push rax
    call icr_wait
    mov ecx, 20
    call delay
    pop rax
    mov [r14 + APIC_ICR_LOW], eax
    jmp icr_wait

/* delay: ECX port reads. */
delay:
1:  in al, 0x80
    dec ecx
    jnz 1b
    ret

/* 3. The AP, in long mode (jumped to from the trampoline). */
ap_main:
    mov ax, 0x18
    mov ds, ax
    mov es, ax
    mov ss, ax
    lock inc dword ptr [TRAMPOLINE + stage_long - trampoline]
    mov r14d, APIC_BASE         /* kept in R14: above 2 GiB, no disp32 reaches it */
    mov edx, [r14 + APIC_ID]
    shr edx, 24
    mov ecx, 1
    lock xadd [next_slot], ecx
    mov [apic_ids + rcx * 4], edx
    lock inc dword ptr [aps_online]
1:  cli
    hlt
    jmp 1b

/*
 * The trampoline: copied to TRAMPOLINE and entered there by SIPI in real mode,
 * CS = TRAMPOLINE >> 4, IP = 0. Position independent: it addresses itself
 * through DS = CS with offsets from `trampoline`, and jumps to absolute
 * addresses computed from TRAMPOLINE.
 */
    .balign 16
trampoline:
    .code16
    cli
    mov ax, cs
    mov ds, ax
    lock inc dword ptr [stage_real - trampoline]
    lgdt [gdtr - trampoline]
    mov eax, cr0
    or eax, 1                   /* CR0.PE */
    mov cr0, eax
    /* ljmpl 0x08:TRAMPOLINE + (tramp32 - trampoline): 32-bit offset far jump. */
    .byte 0x66, 0xea
    .long TRAMPOLINE + tramp32 - trampoline
    .word 0x08

    .code32
tramp32:
    mov ax, 0x18
    mov ds, ax
    mov es, ax
    mov ss, ax
    lock inc dword ptr [TRAMPOLINE + stage_prot - trampoline]
    mov eax, cr4
    or eax, 0x20                /* CR4.PAE */
    mov cr4, eax
    mov eax, PML4
    mov cr3, eax
    mov ecx, MSR_EFER
    rdmsr
    or eax, EFER_LME
    wrmsr
    mov eax, cr0
    or eax, 0x80000000          /* CR0.PG: long mode is now active */
    mov cr0, eax
    .byte 0xea                  /* ljmp 0x10:TRAMPOLINE + (tramp64 - trampoline) */
    .long TRAMPOLINE + tramp64 - trampoline
    .word 0x10

    .code64
tramp64:
    movabs rax, offset ap_main
    jmp rax

    .balign 4
gdtr:
    .word BOOT_GDT_LIMIT
    .long BOOT_GDT
stage_real: .long 0             /* APs that reached real mode */
stage_prot: .long 0             /* ... protected mode */
stage_long: .long 0             /* ... long mode */
trampoline_end:


    .section .rodata
key_cpus:   .asciz "cpus="
key_targeted: .asciz "targeted"
key_wait:   .asciz "wait="
msg_fail:   .asciz "FAIL: APs online "
msg_of:     .asciz " of "
msg_stages: .asciz "; stages: real "
msg_prot:   .asciz ", protected "
msg_long:   .asciz ", long "
msg_online: .asciz "cpus online: "
msg_apic:   .asciz "apic id: "

    .section .data
    .balign 8
wait_rounds: .long 0
next_slot:  .long 0
aps_online: .long 0
apic_ids:   .fill 256, 4, 0
