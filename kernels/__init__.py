"""Custom GPU kernels (installed as ``mlx_kssm.kernels``): Metal sources for the fused oscillator
bank and the selective scan, their MLX wrappers, and the CPU emulator that executes them on
machines without Metal. See README.md in this folder.

    bank.py, bank_forward.metal, bank_backward.metal    the oscillator bank (ops.oscillator_features)
    scan.py, scan_forward.metal, scan_backward.metal    the selective scan (ops.selective_scan[_step])
    launch.py                                           a kernel call, and running it on Metal
    signature.py, emulator.py, emulate.py               the emulator (python -m mlx_kssm.kernels.emulate)
    metal_shim.h, emulate_abi.h, emulate_runtime.cpp    its C++ side

Nothing here is imported unless the op dispatch picks a kernel (Metal, GPU, KSSM_KERNELS != 0)
or the emulator runs.
"""
