/*
 * modes: ember demo chapters 1-3, the x86 boot history in one guest.
 *
 * A PC starts in real mode (8086: 16-bit code, segment*16 + offset, 1 MiB);
 * a boot loader switches to protected mode (a GDT, CR0.PE); a 64-bit kernel
 * then turns on paging and long mode (CR4.PAE, EFER.LME, CR0.PG). ember enters
 * guests the modern way (PVH: 32-bit protected mode, paging off), so this
 * guest first goes *back* to real mode, then walks forward again, printing on
 * the 16550 UART in each mode. The first letter of the command line says where
 * to stop: `r` real mode (chapter 1), `p` protected mode (chapter 2), `l` long
 * mode (chapter 3). It then writes status 0 to ember's exit port, and ember
 * reads the vCPU's CR0/CR4/EFER/CS to show which mode the guest ended in.
 *
 * Specs: Intel SDM vol. 3, 9.9.2 "Switching Back to Real-Address Mode", 9.9.1
 * "Switching to Protected Mode", 9.8.5 "Initializing IA-32e Mode"; PVH entry:
 * xen docs/misc/pvh.pandoc. Plain integer instructions only (kvm_pvm).
 */
    .intel_syntax noprefix
    .include "guest.inc"            /* COM1 and exit-port constants, the macros below */

    .set LOW, 0x10000               /* the 16-bit code runs here: real mode reaches only the first MiB */
    .set LOW_SEG, LOW >> 4
    .set SEL_CODE32, 0x08
    .set SEL_DATA32, 0x10
    .set SEL_CODE16, 0x18           /* 16-bit code, base LOW, limit 64 KiB */
    .set SEL_DATA16, 0x20
    .set SEL_CODE64, 0x28
    .set CR0_PE, 0x1

/* puts: print the NUL-terminated string at \ptr on COM1 (the same text assembles
 * as 16-, 32- or 64-bit code). Each byte: an IN (LSR) and an OUT (THR), two exits. */
    .macro PUTS ptr
1:  COM1_WAIT_THRE
    mov al, [\ptr]
    test al, al
    jz 3f
    mov dx, COM1_THR
    out dx, al
    inc \ptr
    jmp 1b
3:  ret
    .endm

    .macro EXIT0
    xor al, al
    GUEST_EXIT
    .endm

    PVH_NOTE _start

    .section .text.entry, "ax"
    .code32
    .globl _start
_start:                             /* PVH: 32-bit protected mode, EBX = hvm_start_info */
    cli
    mov esi, offset low_start       /* copy the 16-bit code below 1 MiB */
    mov edi, LOW
    mov ecx, low_end - low_start
1:  mov al, [esi]
    mov [edi], al
    inc esi
    inc edi
    dec ecx
    jnz 1b
    mov eax, [ebx + 24]             /* hvm_start_info.cmdline_paddr */
    test eax, eax
    jz 2f
    mov al, [eax]
    mov [LOW + stop_at - low_start], al
2:  lgdt [gdt_ptr]
    ljmp SEL_CODE16, 0              /* to low_start, as 16-bit protected-mode code */

    .code16
low_start:
    /* 16-bit protected mode; going back to real mode: 16-bit segments
     * loaded, then CR0.PE cleared, then a far jump reloads CS (SDM 9.9.2). */
    mov ax, SEL_DATA16
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov eax, cr0
    and eax, ~CR0_PE
    mov cr0, eax
    .byte 0xea                      /* ljmp LOW_SEG:real */
    .word real - low_start
    .word LOW_SEG
real:
    mov ax, cs                      /* real mode: address = segment * 16 + offset */
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov sp, 0xfff0
    mov si, offset msg_real - low_start
    call puts16
    cmp byte ptr [stop_at - low_start], 'r'
    jne 1f
    EXIT0
1:  /* Real -> protected mode, as a boot loader does (SDM 9.9.1): load a GDT,
     * set CR0.PE, far-jump to a 32-bit code segment. */
    lgdt [gdtr_low - low_start]
    mov eax, cr0
    or eax, CR0_PE
    mov cr0, eax
    .byte 0x66, 0xea                /* ljmpl SEL_CODE32:pm32 (a 32-bit offset) */
    .long pm32
    .word SEL_CODE32
puts16:
    PUTS si
gdtr_low:
    .word gdt_end - gdt - 1
    .long gdt
stop_at:
    .byte 0
msg_real:
    .asciz "real mode: 16-bit code at 0x1000:0000 (CR0.PE=0) writes this with OUT to port 0x3f8\n"
low_end:

    .code32
pm32:
    mov ax, SEL_DATA32
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov esp, offset stack_top
    mov esi, offset msg_prot
    call puts32
    cmp byte ptr [LOW + stop_at - low_start], 'p'
    jne 1f
    EXIT0
1:  /* Protected -> long mode (SDM 9.8.5): PAE, a page-table root, EFER.LME,
     * then paging on; a far jump into a 64-bit code segment. */
    ENTER_LONG_MODE pml4
    ljmp SEL_CODE64, offset long_mode
puts32:
    PUTS esi

    .code64
long_mode:
    lea rsi, [msg_long]
    call puts64
    EXIT0
puts64:
    PUTS rsi

    .section .rodata
    .balign 8
gdt:
    .quad 0
    .quad 0x00cf9b000000ffff        /* 0x08: 32-bit code, flat 4 GiB */
    .quad 0x00cf93000000ffff        /* 0x10: data, flat 4 GiB */
    .quad 0x00009b010000ffff        /* 0x18: 16-bit code, base 0x10000, 64 KiB */
    .quad 0x000093010000ffff        /* 0x20: 16-bit data, base 0x10000, 64 KiB */
    .quad 0x00af9b000000ffff        /* 0x28: 64-bit code */
gdt_end:
gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt
msg_prot:
    .asciz "protected mode: CR0.PE=1, flat 4 GiB segments from our GDT, 32-bit code at 1 MiB\n"
msg_long:
    .asciz "long mode: CR4.PAE, EFER.LME and CR0.PG set, 64-bit code on an identity-mapped 2 MiB page\n"

    .section .data
    IDENTITY_MAP_2MIB               /* pml4 -> pdpt -> pd: 0..2 MiB, one large page */

    .section .bss
    .balign 16
stack:  .skip 1024
stack_top:
