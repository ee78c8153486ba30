//! The op suite on the GPU, with the CPU kernels as the oracle (one module per op family).
//! Every case is skipped, with a notice, on a machine without a CUDA driver or device;
//! `scripts/gpu-check.sh` runs this binary on a GPU machine.

mod harness;

mod unary;
