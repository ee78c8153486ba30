//! The op suite on the GPU, with the CPU kernels as the oracle (one module per op family).
//! Every case is skipped, with a notice, on a machine without a CUDA driver or device;
//! `scripts/gpu-check.sh` runs this binary on a GPU machine.

mod harness;

mod concat;
mod dropout;
mod indexing;
mod random;
mod topk;

mod binary;
mod cast;
mod compare;
mod cross_entropy;
mod matmul;
mod norm;
mod optim;
mod reduce;
mod softmax;
mod unary;
mod update;
mod views;

mod host_tier;
