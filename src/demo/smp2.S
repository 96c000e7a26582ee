/*
 * smp2: ember demo chapter 5, two vCPUs.
 *
 * ember starts only vCPU 0 (the bootstrap processor) at the entry point;
 * vCPU 1 waits inside KVM, as a real application processor waits for its
 * start-up IPIs (Intel SDM vol. 3, 9.4.4; MultiProcessor Spec 1.4, B.4). vCPU
 * 0 copies a real-mode trampoline to 0x10000, enables its local APIC (KVM's
 * in-kernel LAPIC, MMIO at 0xfee00000) and sends INIT, then SIPI twice with
 * vector 0x10 (= 0x10000 >> 12) through the ICR. KVM delivers them: vCPU 1
 * wakes in real mode at 0x1000:0000, loads a GDT, enters 32-bit protected
 * mode, prints its line and sets a flag; vCPU 0, polling the flag (each poll
 * reads port 0x80, an exit to ember: a clock without a timer), then prints
 * its own line and exits. The LAPIC writes never reach ember: KVM handles them.
 *
 * Entered by PVH in 32-bit protected mode, paging off. Plain integer code.
 */
    .intel_syntax noprefix
    .include "guest.inc"            /* COM1 and exit-port constants, the macros below */
    .include "lapic.inc"            /* APIC registers, ICR fields, TRAMPOLINE */
    .set SEL_CODE32, 0x08
    .set SEL_DATA32, 0x10
    .set WAIT_ROUNDS, 400000

    PVH_NOTE _start

    .section .text.entry, "ax"
    .code32
    .globl _start
_start:
    mov esp, offset stack_top
    lgdt [gdt_ptr]
    ljmp SEL_CODE32, offset 1f
1:  mov ax, SEL_DATA32
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov esi, offset trampoline      /* the trampoline, where the SIPI vector points */
    mov edi, TRAMPOLINE
    mov ecx, trampoline_end - trampoline
2:  mov al, [esi]
    mov [edi], al
    inc esi
    inc edi
    dec ecx
    jnz 2b
    mov esi, offset msg_bsp
    call puts

    mov ebx, APIC_BASE
    mov eax, [ebx + APIC_SVR]
    or eax, APIC_SVR_ENABLE
    mov [ebx + APIC_SVR], eax
    mov dword ptr [ebx + APIC_ICR_HIGH], 0
    mov dword ptr [ebx + APIC_ICR_LOW], ICR_ALL_BUT_SELF | ICR_LEVEL_ASSERT | ICR_INIT
    call icr_wait
    mov ecx, 100
    call delay
    mov eax, ICR_ALL_BUT_SELF | ICR_LEVEL_ASSERT | ICR_STARTUP | (TRAMPOLINE >> 12)
    mov [ebx + APIC_ICR_LOW], eax
    call icr_wait
    mov ecx, 20
    call delay
    mov [ebx + APIC_ICR_LOW], eax
    call icr_wait

    mov ecx, WAIT_ROUNDS            /* wait for the AP, boundedly */
3:  cmp dword ptr [ap_online], 0
    jne 4f
    in al, 0x80
    dec ecx
    jnz 3b
    mov esi, offset msg_fail
    call puts
    mov al, 1
    jmp exit
4:  mov esi, offset msg_done
    call puts
    xor eax, eax
exit:
    GUEST_EXIT

icr_wait:
    test dword ptr [ebx + APIC_ICR_LOW], APIC_ICR_BUSY
    jnz icr_wait
    ret

delay:                              /* ECX port reads */
    push eax
1:  in al, 0x80
    dec ecx
    jnz 1b
    pop eax
    ret

/* putc: print AL on COM1; puts: print the NUL-terminated string at ESI. Both
 * wait for THRE before every byte (guest.inc). */
    PUTC_PUTS32

/* The AP, in 32-bit protected mode (from the trampoline). */
ap_main:
    mov ax, SEL_DATA32
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov esp, offset ap_stack_top
    mov esi, offset msg_ap
    call puts
    mov eax, [APIC_BASE + APIC_ID]
    shr eax, 24
    add al, '0'
    call putc
    mov al, '\n'
    call putc
    mov dword ptr [ap_online], 1
6:  cli
    hlt                             /* KVM's in-kernel LAPIC parks it: no exit to ember */
    jmp 6b

/* Copied to TRAMPOLINE; entered by SIPI in real mode at CS:IP = 0x1000:0000. */
    .balign 16
trampoline:
    .code16
    cli
    mov ax, cs
    mov ds, ax
    lgdt [gdtr16 - trampoline]      /* 16-bit LGDT: a 24-bit base, enough for 1 MiB */
    mov eax, cr0
    or eax, 1                       /* CR0.PE */
    mov cr0, eax
    .byte 0x66, 0xea                /* ljmpl SEL_CODE32:ap_main */
    .long ap_main
    .word SEL_CODE32
gdtr16:
    .word gdt_end - gdt - 1
    .long gdt
trampoline_end:

    .section .rodata
    .balign 8
gdt:
    .quad 0
    .quad 0x00cf9b000000ffff        /* 0x08: 32-bit code, flat */
    .quad 0x00cf93000000ffff        /* 0x10: data, flat */
gdt_end:
gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt
msg_bsp:  .asciz "vCPU 0: sending INIT and two SIPIs (vector 0x10) to the other vCPUs through the local APIC\n"
msg_ap:   .asciz "vCPU 1: woke in real mode at 0x1000:0000, now in 32-bit protected mode; my APIC id is "
msg_done: .asciz "vCPU 0: vCPU 1 is up; two vCPUs, two threads in ember. Bye.\n"
msg_fail: .asciz "vCPU 0: FAIL: vCPU 1 did not come up\n"

    .section .data
    .balign 4
ap_online: .long 0

    .section .bss
    .balign 16
stack:    .skip 1024
stack_top:
ap_stack: .skip 1024
ap_stack_top:
