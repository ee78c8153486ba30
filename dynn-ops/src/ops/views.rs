//! Zero-copy views (reshape, transpose, permute, narrow, broadcast, squeeze, unsqueeze) and the
//! one copy op that materializes a layout (`contiguous`). A view shares its input's buffer;
//! its backward rule maps the gradient back to the input's shape.

use crate::cpu::gather_layout;
use crate::cuda::{self, CudaSource, CudaStorage, Strided};
use crate::ops::binary::{coalesce, cuda_elementwise_helpers, elementwise_grid, index32};
use crate::ops::indexing::by_size;
use crate::ops::reduce::ReduceOps;
use crate::registry::OpInfo;
use dynn_core::{
    BackwardCtx, CpuStorage, Dim, Error, Idioms, InputGrads, KernelArg, Layout, Op, Outputs,
    Result, Shape, Specs, Tensor, TensorSpec, ViewOp, execute_view, execute1, smallvec::smallvec,
    with_cpu_storage,
};

/// A view op and its parameters.
#[derive(Debug, Clone)]
pub enum View {
    /// New shape over contiguous elements.
    Reshape,
    /// Swap two dims.
    Transpose(usize, usize),
    /// Reorder dims.
    Permute(Vec<usize>),
    /// `len` elements of `dim` from `start`.
    Narrow {
        /// The dim.
        dim: usize,
        /// First index.
        start: usize,
    },
    /// Expand size-1 / missing leading dims.
    Broadcast,
    /// Remove a size-1 dim.
    Squeeze(usize),
    /// Insert a size-1 dim.
    Unsqueeze(usize),
}

impl View {
    /// Op-table names of the views.
    pub const NAMES: [&'static str; 7] = [
        "reshape",
        "transpose",
        "permute",
        "narrow",
        "broadcast_as",
        "squeeze",
        "unsqueeze",
    ];
}

impl ViewOp for View {
    fn name(&self) -> &'static str {
        match self {
            View::Reshape => "reshape",
            View::Transpose(..) => "transpose",
            View::Permute(_) => "permute",
            View::Narrow { .. } => "narrow",
            View::Broadcast => "broadcast_as",
            View::Squeeze(_) => "squeeze",
            View::Unsqueeze(_) => "unsqueeze",
        }
    }
    fn idioms(&self) -> Idioms {
        match self {
            // PyTorch's table: transpose is one layout change.
            View::Transpose(..) | View::Permute(_) => Idioms::LAYOUT,
            _ => Idioms::NONE,
        }
    }
    fn backward(&self, g: &Tensor, input: &TensorSpec) -> Result<Tensor> {
        match self {
            View::Reshape | View::Squeeze(_) | View::Unsqueeze(_) => g.reshape(input.shape.clone()),
            View::Transpose(a, b) => g.transpose(*a, *b),
            View::Permute(p) => {
                let mut inv = vec![0; p.len()];
                for (i, &d) in p.iter().enumerate() {
                    inv[d] = i;
                }
                g.permute(&inv)
            }
            View::Narrow { dim, start } => execute1(
                PadNarrow {
                    dim: *dim,
                    start: *start,
                    size: input.shape.dims()[*dim],
                },
                &[g],
            ),
            View::Broadcast => g.sum_to(&input.shape),
        }
    }
}

/// The CUDA kernels: layout copies that move elements as bits, one entry point per element
/// size (`_1`, `_2`, `_4`, `_8`), so one module (compiled for the f32 scalar) serves every dtype.
/// `copy_*` gathers a strided view into a contiguous buffer; `narrow_backward_*` writes every
/// element of the padded gradient (zero outside the window), so its output needs no fill.
pub const CUDA: CudaSource = CudaSource {
    name: "views",
    code: concat!(
        cuda_elementwise_helpers!(),
        r#"
template <typename I, typename T>
__device__ void copy_t(const T* __restrict__ x, const Strided& xs, T* __restrict__ y, I n) {
    MAP(I, i, n, T, y, x[sat<I>(xs, i)]);
}

// Output index i = (o, k, j) over (outer, size, inner); the window is k in [start, start+len).
template <typename I, typename T>
__device__ __forceinline__ T pad_at(const T* __restrict__ g, const Strided& gs, I i, I span, I inner,
                                    I start, I len) {
    I o = i / span, r = i - o * span;
    I k = r / inner, j = r - k * inner;
    return (k >= start && k - start < len) ? g[sat<I>(gs, (o * len + (k - start)) * inner + j)]
                                           : (T)0;
}

template <typename I, typename T>
__device__ void pad_t(const T* __restrict__ g, const Strided& gs, T* __restrict__ y, I size,
                      I inner, I start, I len, I n) {
    I span = size * inner;
    MAP(I, i, n, T, y, pad_at(g, gs, i, span, inner, start, len));
}

#define VIEWS(SIZE, T) \
extern "C" __global__ void copy_##SIZE(const T* x, Strided xs, T* y, i64 n, int small) { \
    if (small) copy_t<u32, T>(x, xs, y, (u32)n); \
    else copy_t<u64, T>(x, xs, y, (u64)n); \
} \
extern "C" __global__ void narrow_backward_##SIZE(const T* g, Strided gs, T* y, i64 size, \
                                                  i64 inner, i64 start, i64 len, i64 n, \
                                                  int small) { \
    if (small) pad_t<u32, T>(g, gs, y, (u32)size, (u32)inner, (u32)start, (u32)len, (u32)n); \
    else pad_t<u64, T>(g, gs, y, (u64)size, (u64)inner, (u64)start, (u64)len, (u64)n); \
}
VIEWS(1, u8)
VIEWS(2, unsigned short)
VIEWS(4, unsigned int)
VIEWS(8, unsigned long long)
"#
    ),
    half: false,
};

/// `x` gathered into a fresh contiguous GPU buffer.
fn cuda_contiguous(x: &KernelArg<'_>) -> Result<Box<dyn dynn_core::DeviceStorage>> {
    Ok(Box::new(cuda_contiguous_copy("contiguous", x)?))
}

/// The elements of `x` (any layout, broadcast included, any dtype) in row-major order, in a
/// fresh GPU buffer: a copy by element size. Errors name `op`.
pub(crate) fn cuda_contiguous_copy(op: &'static str, x: &KernelArg<'_>) -> Result<CudaStorage> {
    let sx = cuda::storage(op, x)?;
    let dev = sx.dev();
    let n = x.layout.elem_count();
    let mut out = CudaStorage::alloc(dev, x.dtype(), n)?;
    if n == 0 {
        return Ok(out);
    }
    let c = coalesce(x.shape(), &[x.layout]);
    let small = index32(n, &[&c[0]]);
    let view = Strided::of(op, &c[0])?;
    let kernel = by_size(op, x.dtype(), ["copy_1", "copy_2", "copy_4", "copy_8"])?;
    let f = dev.function(&CUDA, dynn_core::DType::F32, kernel)?;
    let n64 = n as i64;
    crate::cuda_launch!(
        dev,
        op,
        f,
        elementwise_grid(n),
        [sx.slice(), &view, out.slice_mut(), &n64, &small]
    )?;
    Ok(out)
}

/// Backward of `narrow`: places the gradient at its slice of a zero tensor of the input's size.
#[derive(Debug, Clone, Copy)]
struct PadNarrow {
    dim: usize,
    start: usize,
    size: usize,
}

impl Op for PadNarrow {
    fn name(&self) -> &'static str {
        "narrow_backward"
    }
    fn idioms(&self) -> Idioms {
        Idioms::NONE
    }
    fn infer(&self, inputs: &[&Tensor]) -> Result<Specs> {
        let mut dims = inputs[0].dims().to_vec();
        dims[self.dim] = self.size;
        Ok(smallvec![TensorSpec::new(dims, inputs[0].dtype())])
    }
    fn forward(&self, inputs: &[KernelArg<'_>], specs: &[TensorSpec]) -> Result<Outputs> {
        let g = inputs[0];
        if cuda::on_cuda(inputs) {
            return Ok(smallvec![self.cuda_forward(&g, &specs[0])?]);
        }
        let out_layout = Layout::contiguous(specs[0].shape.clone()).narrow(
            self.dim,
            self.start,
            g.shape().dims()[self.dim],
        )?;
        let mut out = CpuStorage::zeros(specs[0].dtype, specs[0].shape.elem_count());
        let src = g.cpu(self.name())?;
        match (&mut out, src) {
            (CpuStorage::F32(o), CpuStorage::F32(s)) => scatter_into(o, &out_layout, s, g.layout),
            (CpuStorage::F64(o), CpuStorage::F64(s)) => scatter_into(o, &out_layout, s, g.layout),
            (CpuStorage::F16(o), CpuStorage::F16(s)) => scatter_into(o, &out_layout, s, g.layout),
            (CpuStorage::BF16(o), CpuStorage::BF16(s)) => scatter_into(o, &out_layout, s, g.layout),
            (CpuStorage::I64(o), CpuStorage::I64(s)) => scatter_into(o, &out_layout, s, g.layout),
            (CpuStorage::U32(o), CpuStorage::U32(s)) => scatter_into(o, &out_layout, s, g.layout),
            (CpuStorage::U8(o), CpuStorage::U8(s)) => scatter_into(o, &out_layout, s, g.layout),
            _ => return Err(Error::Msg("narrow_backward: dtype mismatch".into())),
        }
        Ok(crate::cpu::one(out))
    }
    fn differentiable(&self) -> bool {
        false
    }
}

impl PadNarrow {
    /// The padded gradient on the GPU: one kernel writes every output element.
    fn cuda_forward(
        &self,
        g: &KernelArg<'_>,
        spec: &TensorSpec,
    ) -> Result<Box<dyn dynn_core::DeviceStorage>> {
        let name = self.name();
        let sg = cuda::storage(name, g)?;
        let dev = sg.dev();
        let dims = spec.shape.dims();
        let gdims = g.shape().dims();
        if self.dim >= dims.len()
            || gdims.len() != dims.len()
            || self.start + gdims[self.dim] > self.size
        {
            return Err(Error::invalid(
                name,
                format!(
                    "gradient of shape {} does not fit dim {} from {} of shape {}",
                    g.shape(),
                    self.dim,
                    self.start,
                    spec.shape
                ),
            ));
        }
        let n = spec.shape.elem_count();
        let mut out = CudaStorage::alloc(dev, spec.dtype, n)?;
        if n == 0 {
            return Ok(Box::new(out));
        }
        let c = coalesce(g.shape(), &[g.layout]);
        let small = index32(n, &[&c[0]]);
        let view = Strided::of(name, &c[0])?;
        let kernel = by_size(
            name,
            spec.dtype,
            [
                "narrow_backward_1",
                "narrow_backward_2",
                "narrow_backward_4",
                "narrow_backward_8",
            ],
        )?;
        let f = dev.function(&CUDA, dynn_core::DType::F32, kernel)?;
        let inner: usize = dims[self.dim + 1..].iter().product();
        let (size, inner, start, len, n64) = (
            self.size as i64,
            inner as i64,
            self.start as i64,
            gdims[self.dim] as i64,
            n as i64,
        );
        crate::cuda_launch!(
            dev,
            name,
            f,
            elementwise_grid(n),
            [
                sg.slice(),
                &view,
                out.slice_mut(),
                &size,
                &inner,
                &start,
                &len,
                &n64,
                &small
            ]
        )?;
        Ok(Box::new(out))
    }
}

/// Writes `src` (laid out by `src_layout`) into the window `out_layout` of `out` — a narrow of
/// `out`'s contiguous layout. A contiguous source is copied one run at a time (each outer index
/// is one run of `len · inner` elements); any other goes element by element.
fn scatter_into<T: Copy>(out: &mut [T], out_layout: &Layout, src: &[T], src_layout: &Layout) {
    if let (Some((s0, s1)), Some(run)) = (src_layout.contiguous_range(), inner_run(out_layout)) {
        let src = &src[s0..s1];
        let starts = Layout::from_parts(
            Shape::new(&out_layout.dims()[..run.0]),
            out_layout.strides()[..run.0].into(),
            out_layout.offset(),
        );
        for (chunk, o) in src.chunks_exact(run.1).zip(starts.indices()) {
            out[o..o + run.1].copy_from_slice(chunk);
        }
        return;
    }
    for (o, s) in out_layout.indices().zip(src_layout.indices()) {
        out[o] = src[s];
    }
}

/// For a layout whose trailing dims from some `d` on are contiguous: `(d, elements in them)`,
/// with `d` as small as possible (so runs are long). `None` when even the last dim is strided.
fn inner_run(l: &Layout) -> Option<(usize, usize)> {
    let (dims, strides) = (l.dims(), l.strides());
    let mut expect = 1;
    let mut d = dims.len();
    while d > 0 && (strides[d - 1] == expect || dims[d - 1] == 1) {
        expect *= dims[d - 1];
        d -= 1;
    }
    (d < dims.len() || dims.is_empty()).then_some((d, expect))
}

/// Materializes a layout into a fresh contiguous buffer (differentiable identity).
#[derive(Debug, Clone, Copy)]
pub struct Contiguous;

impl Op for Contiguous {
    fn name(&self) -> &'static str {
        "contiguous"
    }
    fn idioms(&self) -> Idioms {
        // PyTorch's table: clone/cat `[0,0,0,0,0,0]`.
        Idioms::NONE
    }
    fn infer(&self, inputs: &[&Tensor]) -> Result<Specs> {
        Ok(smallvec![TensorSpec::new(
            inputs[0].shape().clone(),
            inputs[0].dtype()
        )])
    }
    fn forward(&self, inputs: &[KernelArg<'_>], _: &[TensorSpec]) -> Result<Outputs> {
        let x = inputs[0];
        if cuda::on_cuda(inputs) {
            return Ok(smallvec![cuda_contiguous(&x)?]);
        }
        let s = x.cpu(self.name())?;
        let out: CpuStorage =
            with_cpu_storage!(s, v => dynn_core::CpuElement::wrap(gather_layout(v, x.layout)));
        Ok(crate::cpu::one(out))
    }
    fn backward(&self, ctx: &BackwardCtx<'_>) -> Result<InputGrads> {
        Ok(smallvec![Some(ctx.grad(0)?.clone())])
    }
}

/// Zero-copy views and layout changes.
pub trait ViewOps {
    /// The same elements with a new shape (copies first when not contiguous).
    fn reshape(&self, shape: impl Into<Shape>) -> Result<Tensor>;
    /// Swaps dims `a` and `b`.
    fn transpose<A: Dim, B: Dim>(&self, a: A, b: B) -> Result<Tensor>;
    /// Swaps the last two dims (matrix transpose).
    fn t(&self) -> Result<Tensor>;
    /// Reorders dims: output dim `i` is input dim `perm[i]`.
    fn permute(&self, perm: &[usize]) -> Result<Tensor>;
    /// Elements `start..start + len` of dim `d`.
    fn narrow<D: Dim>(&self, d: D, start: usize, len: usize) -> Result<Tensor>;
    /// Expands to `shape` by broadcasting (stride 0, no copy).
    fn broadcast_as(&self, shape: impl Into<Shape>) -> Result<Tensor>;
    /// Removes size-1 dim `d`.
    fn squeeze<D: Dim>(&self, d: D) -> Result<Tensor>;
    /// Inserts a size-1 dim at `d`.
    fn unsqueeze<D: Dim>(&self, d: D) -> Result<Tensor>;
    /// Merges dims `from..` into one.
    fn flatten_from<D: Dim>(&self, from: D) -> Result<Tensor>;
    /// A contiguous tensor with the same values (no copy when already contiguous).
    fn contiguous(&self) -> Result<Tensor>;
}

impl ViewOps for Tensor {
    fn reshape(&self, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        match self.layout().reshape(&shape)? {
            Some(l) => execute_view(View::Reshape, self, l),
            None => {
                let c = self.contiguous()?;
                let l = c
                    .layout()
                    .reshape(&shape)?
                    .ok_or_else(|| Error::Msg("reshape: copy is not contiguous".into()))?;
                execute_view(View::Reshape, &c, l)
            }
        }
    }
    fn transpose<A: Dim, B: Dim>(&self, a: A, b: B) -> Result<Tensor> {
        let (a, b) = (
            a.index(self.shape(), "transpose")?,
            b.index(self.shape(), "transpose")?,
        );
        execute_view(View::Transpose(a, b), self, self.layout().transpose(a, b)?)
    }
    fn t(&self) -> Result<Tensor> {
        if self.rank() < 2 {
            return Err(Error::invalid(
                "t",
                format!("needs rank >= 2, got shape {}", self.shape()),
            ));
        }
        self.transpose(-2i32, -1i32)
    }
    fn permute(&self, perm: &[usize]) -> Result<Tensor> {
        execute_view(
            View::Permute(perm.to_vec()),
            self,
            self.layout().permute(perm)?,
        )
    }
    fn narrow<D: Dim>(&self, d: D, start: usize, len: usize) -> Result<Tensor> {
        let dim = d.index(self.shape(), "narrow")?;
        execute_view(
            View::Narrow { dim, start },
            self,
            self.layout().narrow(dim, start, len)?,
        )
    }
    fn broadcast_as(&self, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if &shape == self.shape() {
            return Ok(self.clone());
        }
        execute_view(View::Broadcast, self, self.layout().broadcast_as(&shape)?)
    }
    fn squeeze<D: Dim>(&self, d: D) -> Result<Tensor> {
        let d = d.index(self.shape(), "squeeze")?;
        execute_view(View::Squeeze(d), self, self.layout().squeeze(d)?)
    }
    fn unsqueeze<D: Dim>(&self, d: D) -> Result<Tensor> {
        let d = d.index_for_insert(self.shape(), "unsqueeze")?;
        execute_view(View::Unsqueeze(d), self, self.layout().unsqueeze(d)?)
    }
    fn flatten_from<D: Dim>(&self, from: D) -> Result<Tensor> {
        let from = from.index(self.shape(), "flatten_from")?;
        let mut dims = self.dims()[..from].to_vec();
        dims.push(self.dims()[from..].iter().product());
        self.reshape(dims)
    }
    fn contiguous(&self) -> Result<Tensor> {
        if self.is_contiguous() {
            Ok(self.clone())
        } else {
            execute1(Contiguous, &[self])
        }
    }
}

/// This file's entries in the op table.
pub(crate) fn ops() -> Vec<OpInfo> {
    let mut v: Vec<OpInfo> = View::NAMES
        .iter()
        .map(|&name| OpInfo {
            name,
            idioms: if matches!(name, "transpose" | "permute") {
                Idioms::LAYOUT
            } else {
                Idioms::NONE
            },
            differentiable: true,
            family: "views",
        })
        .collect();
    v.push(OpInfo {
        name: "contiguous",
        idioms: Idioms::NONE,
        differentiable: true,
        family: "views",
    });
    v.push(OpInfo {
        name: "narrow_backward",
        idioms: Idioms::NONE,
        differentiable: false,
        family: "views",
    });
    v
}
