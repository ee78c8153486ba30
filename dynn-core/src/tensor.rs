//! The tensor: a handle to a movable buffer, a layout over it, and its autograd identity.

use crate::autograd::{GradHookHandle, GradMeta, LeafGrad};
use crate::{
    Buffer, BufferKind, CpuElement, CpuStorage, DType, Device, Element, Error, Layout, Result,
    Shape, with_cpu_storage,
};
use std::sync::Arc;

/// An n-dimensional array. Cloning is cheap (a reference count); views share the buffer.
#[derive(Clone)]
pub struct Tensor(Arc<TensorInner>);

pub(crate) struct TensorInner {
    pub(crate) buffer: Arc<Buffer>,
    pub(crate) layout: Layout,
    pub(crate) grad: Option<GradMeta>,
}

impl Tensor {
    pub(crate) fn from_parts(buffer: Arc<Buffer>, layout: Layout, grad: Option<GradMeta>) -> Self {
        Tensor(Arc::new(TensorInner {
            buffer,
            layout,
            grad,
        }))
    }

    /// A tensor over `buffer` with `layout`, tracked by no tape (used by backends and views).
    pub fn from_buffer(buffer: Arc<Buffer>, layout: Layout) -> Result<Self> {
        if layout.max_extent() > buffer.len() {
            return Err(Error::invalid(
                "from_buffer",
                format!(
                    "layout {:?} reaches element {} of a buffer of {}",
                    layout,
                    layout.max_extent(),
                    buffer.len()
                ),
            ));
        }
        Ok(Self::from_parts(buffer, layout, None))
    }

    fn from_host(
        storage: CpuStorage,
        shape: Shape,
        device: Device,
        kind: BufferKind,
    ) -> Result<Self> {
        if storage.len() != shape.elem_count() {
            return Err(Error::invalid(
                "from_vec",
                format!(
                    "{} elements do not fill shape {} ({} elements)",
                    storage.len(),
                    shape,
                    shape.elem_count()
                ),
            ));
        }
        let dev = device.backend()?.upload(&storage)?;
        let buffer = Arc::new(Buffer::from_storage(dev, kind));
        if let Some(h) = crate::memory_hooks() {
            h.buffer_created(&buffer);
        }
        Ok(Self::from_parts(buffer, Layout::contiguous(shape), None))
    }

    /// A tensor from a vector of elements in row-major order.
    pub fn from_vec<T: CpuElement>(
        data: Vec<T>,
        shape: impl Into<Shape>,
        device: Device,
    ) -> Result<Self> {
        Self::from_host(T::wrap(data), shape.into(), device, BufferKind::Activation)
    }

    /// A tensor from a slice of elements in row-major order.
    pub fn from_slice<T: CpuElement>(
        data: &[T],
        shape: impl Into<Shape>,
        device: Device,
    ) -> Result<Self> {
        Self::from_vec(data.to_vec(), shape, device)
    }

    /// A tensor from host storage (any dtype).
    pub fn from_storage(
        storage: CpuStorage,
        shape: impl Into<Shape>,
        device: Device,
    ) -> Result<Self> {
        Self::from_host(storage, shape.into(), device, BufferKind::Activation)
    }

    /// A rank-0 tensor.
    pub fn scalar<T: CpuElement>(v: T, device: Device) -> Result<Self> {
        Self::from_vec(vec![v], (), device)
    }

    /// A tensor filled with `value` (converted to `dtype`).
    pub fn full(value: f64, shape: impl Into<Shape>, dtype: DType, device: Device) -> Result<Self> {
        let shape = shape.into();
        let n = shape.elem_count();
        let s = match dtype {
            DType::F32 => CpuStorage::F32(vec![value as f32; n]),
            DType::F64 => CpuStorage::F64(vec![value; n]),
            DType::F16 => CpuStorage::F16(vec![half::f16::from_f64(value); n]),
            DType::BF16 => CpuStorage::BF16(vec![half::bf16::from_f64(value); n]),
            DType::I64 => CpuStorage::I64(vec![value as i64; n]),
            DType::U32 => CpuStorage::U32(vec![value as u32; n]),
            DType::U8 => CpuStorage::U8(vec![value as u8; n]),
        };
        Self::from_host(s, shape, device, BufferKind::Activation)
    }

    /// A tensor of zeros.
    pub fn zeros(shape: impl Into<Shape>, dtype: DType, device: Device) -> Result<Self> {
        Self::full(0.0, shape, dtype, device)
    }

    /// A tensor of ones.
    pub fn ones(shape: impl Into<Shape>, dtype: DType, device: Device) -> Result<Self> {
        Self::full(1.0, shape, dtype, device)
    }

    /// Zeros with this tensor's shape, dtype and device.
    pub fn zeros_like(&self) -> Result<Self> {
        Self::zeros(self.shape(), self.dtype(), self.device())
    }

    /// Ones with this tensor's shape, dtype and device.
    pub fn ones_like(&self) -> Result<Self> {
        Self::ones(self.shape(), self.dtype(), self.device())
    }

    /// The shape.
    pub fn shape(&self) -> &Shape {
        self.0.layout.shape()
    }

    /// The dims.
    pub fn dims(&self) -> &[usize] {
        self.0.layout.dims()
    }

    /// The rank.
    pub fn rank(&self) -> usize {
        self.shape().rank()
    }

    /// The two dims of a rank-2 tensor (an error naming the shape otherwise).
    pub fn dims2(&self) -> Result<(usize, usize)> {
        match *self.dims() {
            [a, b] => Ok((a, b)),
            _ => Err(self.rank_error(2)),
        }
    }

    /// The three dims of a rank-3 tensor (an error naming the shape otherwise).
    pub fn dims3(&self) -> Result<(usize, usize, usize)> {
        match *self.dims() {
            [a, b, c] => Ok((a, b, c)),
            _ => Err(self.rank_error(3)),
        }
    }

    /// The four dims of a rank-4 tensor (an error naming the shape otherwise).
    pub fn dims4(&self) -> Result<(usize, usize, usize, usize)> {
        match *self.dims() {
            [a, b, c, d] => Ok((a, b, c, d)),
            _ => Err(self.rank_error(4)),
        }
    }

    fn rank_error(&self, want: usize) -> Error {
        Error::invalid(
            "dims",
            format!("expected a rank-{want} tensor, got shape {}", self.shape()),
        )
    }

    /// Number of elements.
    pub fn elem_count(&self) -> usize {
        self.shape().elem_count()
    }

    /// The size of dim `d`.
    pub fn dim<D: crate::Dim>(&self, d: D) -> Result<usize> {
        self.shape().dim(d, "dim")
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.0.buffer.dtype()
    }

    /// The device.
    pub fn device(&self) -> Device {
        self.0.buffer.device()
    }

    /// The layout over the buffer.
    pub fn layout(&self) -> &Layout {
        &self.0.layout
    }

    /// The buffer handle.
    pub fn buffer(&self) -> &Arc<Buffer> {
        &self.0.buffer
    }

    /// True when the elements are row-major without gaps.
    pub fn is_contiguous(&self) -> bool {
        self.0.layout.is_contiguous()
    }

    /// Marks the buffer's kind (e.g. [`BufferKind::Parameter`]).
    pub fn set_kind(&self, kind: BufferKind) {
        self.0.buffer.set_kind(kind)
    }

    /// The bytes on the host, wherever they are (asking the memory manager to recompute a
    /// dropped buffer).
    fn host_bytes(&self, op: &'static str) -> Result<CpuStorage> {
        match self.0.buffer.to_host(op) {
            Err(Error::NotResident { .. }) if crate::memory_hooks().is_some() => {
                if let Some(h) = crate::memory_hooks() {
                    h.materialize(&self.0.buffer)?;
                }
                self.0.buffer.to_host(op)
            }
            other => other,
        }
    }

    /// A copy of this tensor's elements on `device` (contiguous, detached from the tape: a
    /// leaf). Returns a clone when it is already there.
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        if device == self.device() {
            return Ok(self.clone());
        }
        let host = self.host_bytes("to_device")?;
        let host = match self.0.layout.contiguous_range() {
            Some((0, end)) if end == host.len() => host,
            _ => with_cpu_storage!(&host, v => {
                let picked: Vec<_> = self.0.layout.indices().map(|i| v[i]).collect();
                CpuElement::wrap(picked)
            }),
        };
        Self::from_host(host, self.shape().clone(), device, self.0.buffer.kind())
    }

    /// The elements in row-major order, converted to `T`'s dtype only if equal (else an error).
    pub fn to_vec<T: CpuElement>(&self) -> Result<Vec<T>> {
        let host = self.host_bytes("to_vec")?;
        let data = host.as_slice::<T>("to_vec")?;
        Ok(match self.0.layout.contiguous_range() {
            Some((a, b)) => data[a..b].to_vec(),
            None => self.0.layout.indices().map(|i| data[i]).collect(),
        })
    }

    /// The elements in row-major order as f64, whatever the dtype.
    pub fn to_f64_vec(&self) -> Result<Vec<f64>> {
        let host = self.host_bytes("to_f64_vec")?;
        Ok(with_cpu_storage!(&host, v => self.0.layout.indices().map(|i| v[i].to_f64()).collect()))
    }

    /// The only element of a one-element tensor, as f64.
    pub fn to_scalar_f64(&self) -> Result<f64> {
        if self.elem_count() != 1 {
            return Err(Error::invalid(
                "to_scalar",
                format!(
                    "tensor of shape {} has {} elements, not 1",
                    self.shape(),
                    self.elem_count()
                ),
            ));
        }
        Ok(self.to_f64_vec()?[0])
    }

    /// The only element of a one-element tensor.
    pub fn to_scalar<T: CpuElement>(&self) -> Result<T> {
        if self.elem_count() != 1 {
            return Err(Error::invalid(
                "to_scalar",
                format!(
                    "tensor of shape {} has {} elements, not 1",
                    self.shape(),
                    self.elem_count()
                ),
            ));
        }
        Ok(self.to_vec::<T>()?[0])
    }

    /// Rows of a rank-2 tensor.
    pub fn to_vec2<T: CpuElement>(&self) -> Result<Vec<Vec<T>>> {
        let [_, c] = *self.dims() else {
            return Err(Error::invalid(
                "to_vec2",
                format!("expected rank 2, got shape {}", self.shape()),
            ));
        };
        Ok(self
            .to_vec::<T>()?
            .chunks(c.max(1))
            .map(|r| r.to_vec())
            .collect())
    }

    // ----- autograd -----

    pub(crate) fn grad_meta(&self) -> Option<&GradMeta> {
        self.0.grad.as_ref()
    }

    /// True when gradients flow to or through this tensor.
    pub fn requires_grad(&self) -> bool {
        self.0.grad.is_some()
    }

    /// True when this tensor is a leaf of the tape (created by the user, not by a recorded op).
    pub fn is_leaf(&self) -> bool {
        !matches!(self.0.grad, Some(GradMeta::Node { .. }))
    }

    /// This tensor as a leaf that accumulates gradients (`on = true`) or a plain tensor
    /// (`on = false`). Shares the buffer.
    pub fn set_requires_grad(self, on: bool) -> Tensor {
        let grad = on.then(|| GradMeta::Leaf(Arc::new(LeafGrad::default())));
        Self::from_parts(self.0.buffer.clone(), self.0.layout.clone(), grad)
    }

    /// The same data, cut from the tape.
    pub fn detach(&self) -> Tensor {
        Self::from_parts(self.0.buffer.clone(), self.0.layout.clone(), None)
    }

    /// The accumulated gradient of a leaf, if backward reached it.
    pub fn grad(&self) -> Option<Tensor> {
        match &self.0.grad {
            Some(GradMeta::Leaf(l)) => l.get(),
            _ => None,
        }
    }

    /// Clears the accumulated gradient of a leaf.
    pub fn zero_grad(&self) {
        if let Some(GradMeta::Leaf(l)) = &self.0.grad {
            l.set(None);
        }
    }

    /// Runs `hook` with this leaf's accumulated gradient whenever a backward pass has delivered
    /// its last contribution to it, while the pass goes on (PyTorch's
    /// `register_post_accumulate_grad_hook`). Work on a gradient can then happen while the
    /// gradient is fresh on the device, e.g. its share of a global norm. The hook runs in the
    /// backward phase with the tape off; an error it returns ends the backward pass with that
    /// error. It stays registered until the returned handle is dropped.
    pub fn on_grad_ready(
        &self,
        hook: impl Fn(&Tensor) -> Result<()> + Send + Sync + 'static,
    ) -> Result<GradHookHandle> {
        match &self.0.grad {
            Some(GradMeta::Leaf(l)) => Ok(l.add_hook(Arc::new(hook))),
            _ => Err(Error::Autograd(format!(
                "on_grad_ready: only a leaf that requires grad accumulates a gradient (tensor of shape {})",
                self.shape()
            ))),
        }
    }

    /// Replaces the accumulated gradient of a leaf (e.g. after clipping).
    pub fn set_grad(&self, grad: Option<Tensor>) -> Result<()> {
        match &self.0.grad {
            Some(GradMeta::Leaf(l)) => {
                l.set(grad);
                Ok(())
            }
            _ => Err(Error::Autograd(
                "set_grad: only leaves that require grad hold a gradient".into(),
            )),
        }
    }

    /// A new tensor sharing this one's buffer with another layout and autograd identity.
    pub(crate) fn view_with(&self, layout: Layout, grad: Option<GradMeta>) -> Tensor {
        Self::from_parts(self.0.buffer.clone(), layout, grad)
    }

    /// True when both handles refer to the same tensor object.
    pub fn same_as(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tensor[{}; {}; {:?}; buffer {}",
            self.shape(),
            self.dtype(),
            self.device(),
            self.0.buffer.id()
        )?;
        if self.requires_grad() {
            write!(f, "; grad")?;
        }
        if self.elem_count() <= 16
            && let Ok(v) = self.to_f64_vec()
        {
            write!(f, "; {v:?}")?;
        }
        write!(f, "]")
    }
}
