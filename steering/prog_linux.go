//go:build linux

package steering

import (
	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
)

// skPass is SK_PASS, the return value of an SK_REUSEPORT program that lets
// the connection through: to the socket it selected, if any, or else to the
// socket the kernel's hash picks. The program never returns SK_DROP, which
// would refuse the connection.
const skPass = 1

// Map names, also the file names of the pinned maps in Options.PinPath.
const (
	socksName  = "shoal_socks"  // REUSEPORT_SOCKARRAY: slot -> socket
	ringName   = "shoal_ring"   // two rings {n u32; slots [MaxSlots]u32}
	activeName = "shoal_active" // which ring the program reads: 0 or 1
	countsName = "shoal_counts" // per slot: connections steered; at MaxSlots: the ticket
)

// fetchAdd returns the instruction
//
//	src = atomic_fetch_add((u64 *)(dst + off), src)
//
// cilium/ebpf v0.22.0 marshals an atomic instruction's immediate (which
// names the atomic operation) from the Constant field as it was before
// translating the opcode, so asm.FetchAdd.Mem alone comes out with an
// immediate of 0: a plain atomic add that leaves src unchanged. A
// round-robin counter built on it sends every connection to one slot. The
// immediate is set here by hand to BPF_ADD|BPF_FETCH; TestFetchAddEncoding
// checks the bytes and what the kernel computes.
func fetchAdd(dst, src asm.Register, off int16) asm.Instruction {
	ins := asm.FetchAdd.Mem(dst, src, asm.DWord, off)
	ins.Constant = int64(asm.FetchAdd >> 8) // BPF_ADD (0x00) | BPF_FETCH (0x01)
	return ins
}

// program returns the SK_REUSEPORT program. In C it would read:
//
//	u64 ticket = __sync_fetch_and_add(&counts[max], 1);
//	u32 *active = lookup(&active_map, 0);
//	struct ring *r = lookup(&rings, *active);
//	if (r->n == 0 || r->n > max) return SK_PASS;        // kernel's hash
//	u32 slot = r->slots[ticket % r->n];
//	if (bpf_sk_select_reuseport(ctx, &socks, &slot, 0)) return SK_PASS;
//	__sync_fetch_and_add(&counts[slot], 1);
//	return SK_PASS;
//
// with every failed lookup also returning SK_PASS without a selection.
func program(socks, rings, active, counts *ebpf.Map, maxSlots int) asm.Instructions {
	max := int32(maxSlots)
	return asm.Instructions{
		asm.Mov.Reg(asm.R6, asm.R1), // r6 = ctx

		// r7 = ticket: counts[max] fetch-and-add 1.
		asm.StoreImm(asm.RFP, -4, int64(max), asm.Word),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, -4),
		asm.LoadMapPtr(asm.R1, counts.FD()),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, "pass"),
		asm.Mov.Imm(asm.R1, 1),
		fetchAdd(asm.R0, asm.R1, 0),
		asm.Mov.Reg(asm.R7, asm.R1),

		// r1 = active ring index.
		asm.StoreImm(asm.RFP, -4, 0, asm.Word),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, -4),
		asm.LoadMapPtr(asm.R1, active.FD()),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, "pass"),
		asm.LoadMem(asm.R1, asm.R0, 0, asm.Word),

		// r0 = the active ring.
		asm.StoreMem(asm.RFP, -4, asm.R1, asm.Word),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, -4),
		asm.LoadMapPtr(asm.R1, rings.FD()),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, "pass"),

		// r2 = n; nothing selectable: the kernel's hash.
		asm.LoadMem(asm.R2, asm.R0, 0, asm.Word),
		asm.JEq.Imm(asm.R2, 0, "pass"),
		asm.JGT.Imm(asm.R2, max, "pass"),

		// slot = slots[ticket % n], stored at fp-8.
		asm.Mod.Reg(asm.R7, asm.R2),
		asm.JGE.Imm(asm.R7, max, "pass"), // bound for the verifier
		asm.LSh.Imm(asm.R7, 2),
		asm.Add.Reg(asm.R0, asm.R7),
		asm.LoadMem(asm.R1, asm.R0, 4, asm.Word),
		asm.StoreMem(asm.RFP, -8, asm.R1, asm.Word),

		// bpf_sk_select_reuseport(ctx, &socks, &slot, 0)
		asm.Mov.Reg(asm.R1, asm.R6),
		asm.LoadMapPtr(asm.R2, socks.FD()),
		asm.Mov.Reg(asm.R3, asm.RFP),
		asm.Add.Imm(asm.R3, -8),
		asm.Mov.Imm(asm.R4, 0),
		asm.FnSkSelectReuseport.Call(),
		asm.JNE.Imm(asm.R0, 0, "pass"),

		// counts[slot] += 1
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, -8),
		asm.LoadMapPtr(asm.R1, counts.FD()),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, "pass"),
		asm.Mov.Imm(asm.R1, 1),
		asm.StoreXAdd(asm.R0, asm.R1, asm.DWord),

		asm.Mov.Imm(asm.R0, skPass).WithSymbol("pass"),
		asm.Return(),
	}
}

// mapSpecs returns the specs of the program's maps for maxSlots slots,
// pinned by name when pin is true.
func mapSpecs(maxSlots int, pin bool) (socks, rings, active, counts *ebpf.MapSpec) {
	pinning := ebpf.PinNone
	if pin {
		pinning = ebpf.PinByName
	}
	socks = &ebpf.MapSpec{
		Name:       socksName,
		Type:       ebpf.ReusePortSockArray,
		KeySize:    4,
		ValueSize:  8,
		MaxEntries: uint32(maxSlots),
		Pinning:    pinning,
	}
	rings = &ebpf.MapSpec{
		Name:       ringName,
		Type:       ebpf.Array,
		KeySize:    4,
		ValueSize:  uint32(4 + 4*maxSlots),
		MaxEntries: 2,
		Pinning:    pinning,
	}
	active = &ebpf.MapSpec{
		Name:       activeName,
		Type:       ebpf.Array,
		KeySize:    4,
		ValueSize:  4,
		MaxEntries: 1,
		Pinning:    pinning,
	}
	counts = &ebpf.MapSpec{
		Name:       countsName,
		Type:       ebpf.Array,
		KeySize:    4,
		ValueSize:  8,
		MaxEntries: uint32(maxSlots + 1),
		Pinning:    pinning,
	}
	return
}
