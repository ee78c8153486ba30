//! Every kind of error is a typed `Error` with a message that says what and where, never a
//! panic: one test per kind, checking the variant and the message.

use dynn_core::{
    Backend, CpuStorage, DeviceStorage, MemoryHooks, OpEvent, Residency, Tensor,
    install_memory_hooks, register_backend,
};
use dynn_ops::prelude::*;
use std::sync::{Arc, Mutex};

fn t(shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::from_vec(
        (0..n).map(|i| i as f32 * 0.25 + 0.5).collect::<Vec<_>>(),
        shape,
        Device::Cpu,
    )
    .unwrap()
}

fn has_all(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "message {msg:?} lacks {p:?}");
    }
}

#[test]
fn shape_mismatch_names_the_op_and_both_shapes() {
    let e = t(&[2, 3]).add(&t(&[4])).unwrap_err();
    assert!(
        matches!(&e, Error::ShapeMismatch { op: "add", lhs, rhs } if lhs.dims() == [2, 3] && rhs.dims() == [4]),
        "{e:?}"
    );
    has_all(&e.to_string(), &["add", "shape mismatch", "[2, 3]", "[4]"]);
    // Broadcasting a view to an incompatible shape, and sum_to an unrelated shape.
    let e = t(&[3, 2]).broadcast_as((3, 4)).unwrap_err();
    assert!(
        matches!(
            e,
            Error::ShapeMismatch {
                op: "broadcast_as",
                ..
            }
        ),
        "{e:?}"
    );
    has_all(&e.to_string(), &["broadcast_as", "[3, 2]", "[3, 4]"]);
    let e = t(&[3, 2]).sum_to(&Shape::new(&[3])).unwrap_err();
    has_all(&e.to_string(), &["sum_to", "[3, 2]", "[3]"]);
    // A backward seed of the wrong shape.
    let x = t(&[2, 2]).set_requires_grad(true);
    let e = x.exp().unwrap().backward_with(t(&[4])).unwrap_err();
    has_all(&e.to_string(), &["backward", "[4]", "[2, 2]"]);
}

#[test]
fn dtype_mismatch_names_both_dtypes() {
    let b = Tensor::ones(3, DType::F64, Device::Cpu).unwrap();
    let e = t(&[3]).add(&b).unwrap_err();
    assert!(
        matches!(
            e,
            Error::DTypeMismatch {
                op: "add",
                expected: DType::F32,
                got: DType::F64
            }
        ),
        "{e:?}"
    );
    has_all(&e.to_string(), &["add", "dtype mismatch", "F32", "F64"]);
    // Reading elements as the wrong type.
    let e = t(&[3]).to_vec::<f64>().unwrap_err();
    has_all(&e.to_string(), &["to_vec", "F64", "F32"]);
}

#[test]
fn unsupported_dtype_names_the_op() {
    let x = Tensor::from_vec(vec![1i64, 2, 3], 3, Device::Cpu).unwrap();
    let e = x.exp().unwrap_err();
    assert!(
        matches!(
            e,
            Error::UnsupportedDType {
                op: "exp",
                dtype: DType::I64,
                ..
            }
        ),
        "{e:?}"
    );
    has_all(&e.to_string(), &["exp", "unsupported dtype", "I64"]);
    let e = x.max_dims(&[0], false).unwrap_err();
    has_all(&e.to_string(), &["max", "I64"]);
    let e = x.add(&x).unwrap_err();
    has_all(&e.to_string(), &["add", "I64"]);
}

#[test]
fn dim_out_of_range_names_dim_rank_and_shape() {
    let e = t(&[2, 3]).sum_dims(&[5], false).unwrap_err();
    assert!(
        matches!(
            &e,
            Error::DimOutOfRange {
                op: "sum",
                dim: 5,
                rank: 2,
                ..
            }
        ),
        "{e:?}"
    );
    has_all(&e.to_string(), &["sum", "dimension 5", "rank 2", "[2, 3]"]);
    let e = t(&[2, 3]).transpose(0, -3i32).unwrap_err();
    has_all(&e.to_string(), &["transpose", "dimension -3", "rank 2"]);
    let e = t(&[2, 3]).unsqueeze(4).unwrap_err();
    has_all(&e.to_string(), &["unsqueeze", "dimension 4"]);
    let e = t(&[2, 3]).max_dims(&[2], false).unwrap_err();
    has_all(&e.to_string(), &["max", "dimension 2"]);
}

#[test]
fn index_out_of_range_on_narrow_past_the_end() {
    let e = t(&[3, 4]).narrow(1, 3, 2).unwrap_err();
    assert!(
        matches!(
            e,
            Error::IndexOutOfRange {
                op: "narrow",
                index: 5,
                size: 4,
                ..
            }
        ),
        "{e:?}"
    );
    has_all(
        &e.to_string(),
        &["narrow", "index 5", "size 4", "start 3", "len 2", "[3, 4]"],
    );
    // An overflowing start is an error too, not a wrap-around.
    assert!(matches!(
        t(&[3, 4]).narrow(0, usize::MAX, 2).unwrap_err(),
        Error::IndexOutOfRange { .. }
    ));
}

#[test]
fn invalid_arguments_say_what_is_wrong() {
    let e = t(&[2, 3]).reshape(4).unwrap_err();
    assert!(
        matches!(e, Error::InvalidArgument { op: "reshape", .. }),
        "{e:?}"
    );
    has_all(
        &e.to_string(),
        &[
            "reshape",
            "invalid argument",
            "[2, 3]",
            "6 elements",
            "[4]",
            "4 elements",
        ],
    );
    // A dense layer's bias that does not match its weight's outputs, and a weight of rank 3.
    let e = t(&[2, 3]).linear(&t(&[3, 4]), &t(&[5])).unwrap_err();
    assert!(
        matches!(e, Error::InvalidArgument { op: "linear", .. }),
        "{e:?}"
    );
    has_all(&e.to_string(), &["linear", "bias", "(4,)", "[5]", "[3, 4]"]);
    let e = t(&[2, 3]).linear(&t(&[1, 3, 4]), &t(&[4])).unwrap_err();
    has_all(&e.to_string(), &["linear", "weight", "[1, 3, 4]"]);
    // A residual that is not the output's shape; the fused variants name themselves.
    let e = t(&[2, 4])
        .add_linear(&t(&[2, 3]), &t(&[3, 5]), &t(&[5]))
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidArgument {
                op: "add_linear",
                ..
            }
        ),
        "{e:?}"
    );
    has_all(
        &e.to_string(),
        &["add_linear", "residual", "[2, 5]", "[2, 4]"],
    );
    let e = t(&[2, 3])
        .linear_act(&t(&[3, 4]), &t(&[3]), Activation::Sigmoid)
        .unwrap_err();
    has_all(&e.to_string(), &["linear_sigmoid", "bias", "(4,)", "[3]"]);
    let e = t(&[2, 3]).addcmul(&t(&[2, 4]), &t(&[4])).unwrap_err();
    has_all(&e.to_string(), &["addcmul", "[2, 3]", "[2, 4]"]);
    let e = t(&[2, 3])
        .attention_probs(&t(&[4, 3]), Some(&t(&[3, 4])), 1.0)
        .unwrap_err();
    has_all(
        &e.to_string(),
        &["attention_probs", "bias", "[3, 4]", "[2, 4]"],
    );
    let e = t(&[2, 3])
        .attention_probs(&t(&[4, 5]), None, 1.0)
        .unwrap_err();
    has_all(
        &e.to_string(),
        &["attention_probs", "shape mismatch", "[2, 3]", "[4, 5]"],
    );
    let e = t(&[2, 3]).linear(&t(&[2, 4]), &t(&[4])).unwrap_err();
    has_all(
        &e.to_string(),
        &["linear", "shape mismatch", "[2, 3]", "[2, 4]"],
    );
    let e = t(&[2, 3]).permute(&[0, 0]).unwrap_err();
    assert!(
        matches!(e, Error::InvalidArgument { op: "permute", .. }),
        "{e:?}"
    );
    has_all(&e.to_string(), &["permute", "[0, 0]", "not a permutation"]);
    let e = t(&[2, 3]).permute(&[1]).unwrap_err();
    has_all(&e.to_string(), &["permute", "[1]"]);
    let e = t(&[2, 3]).squeeze(1).unwrap_err();
    has_all(&e.to_string(), &["squeeze", "size 3, not 1"]);
    let e = Tensor::from_vec(vec![1.0f32; 5], (2, 3), Device::Cpu).unwrap_err();
    has_all(&e.to_string(), &["from_vec", "5 elements", "[2, 3]"]);
    let e = t(&[2, 3]).to_scalar_f64().unwrap_err();
    has_all(&e.to_string(), &["to_scalar", "6 elements"]);
}

#[test]
fn offloaded_and_dropped_buffers_are_not_resident_without_hooks() {
    let x = t(&[2, 3]);
    let want = x.to_vec::<f32>().unwrap();
    assert_eq!(x.buffer().offload().unwrap(), 24);
    assert_eq!(x.buffer().residency(), Residency::Host);
    let e = x.exp().unwrap_err();
    assert!(
        matches!(
            e,
            Error::NotResident {
                op: "exp",
                residency: Residency::Host,
                ..
            }
        ),
        "{e:?}"
    );
    has_all(
        &e.to_string(),
        &[
            "exp",
            &format!("buffer {}", x.buffer().id().0),
            "not resident",
            "Host",
        ],
    );
    // The host tier is still readable, and a fetch makes it usable again.
    assert_eq!(x.to_vec::<f32>().unwrap(), want);
    x.buffer().fetch().unwrap();
    assert!(x.exp().is_ok());

    let y = t(&[4]);
    assert_eq!(y.buffer().drop_data(), 16);
    let e = y.add(&y).unwrap_err();
    assert!(
        matches!(
            e,
            Error::NotResident {
                op: "add",
                residency: Residency::Dropped,
                ..
            }
        ),
        "{e:?}"
    );
    has_all(&e.to_string(), &["add", "Dropped"]);
    let e = y.to_vec::<f32>().unwrap_err();
    has_all(&e.to_string(), &["to_vec", "Dropped"]);
    assert!(matches!(
        y.buffer().fetch().unwrap_err(),
        Error::NotResident { op: "fetch", .. }
    ));
}

#[test]
fn autograd_errors_explain_themselves() {
    // Backward on a non-scalar.
    let x = t(&[2, 3]).set_requires_grad(true);
    let e = x.exp().unwrap().backward().unwrap_err();
    assert!(matches!(e, Error::Autograd(_)), "{e:?}");
    has_all(
        &e.to_string(),
        &["autograd", "scalar", "[2, 3]", "backward_with"],
    );
    // Backward on a tensor that does not require grad.
    let e = t(&[1])
        .exp()
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap_err();
    has_all(&e.to_string(), &["autograd", "does not require grad"]);
    // A second backward after the first released the saved tensors.
    let y = x.exp().unwrap().sum_all().unwrap();
    y.backward().unwrap();
    let e = y.backward().unwrap_err();
    assert!(matches!(e, Error::Autograd(_)), "{e:?}");
    has_all(
        &e.to_string(),
        &["already released", "run the forward again"],
    );
    // Only leaves hold a gradient.
    let e = x.exp().unwrap().set_grad(None).unwrap_err();
    has_all(&e.to_string(), &["set_grad", "leaves"]);
}

#[test]
fn a_device_without_backend_is_an_error_not_a_panic() {
    let e = Tensor::zeros((2, 3), DType::F32, Device::Cuda(0)).unwrap_err();
    assert!(matches!(e, Error::Device { .. }), "{e:?}");
    has_all(&e.to_string(), &["device", "Cuda(0)", "no backend"]);
    assert!(Tensor::from_vec(vec![1.0f32], 1, Device::Cuda(0)).is_err());
}

/// A fake accelerator: host memory that says it is on `Cuda(7)`. No kernel supports it.
#[derive(Debug, Clone)]
struct FakeStorage(CpuStorage);

impl DeviceStorage for FakeStorage {
    fn dtype(&self) -> DType {
        self.0.dtype()
    }
    fn len(&self) -> usize {
        self.0.len()
    }
    fn device(&self) -> Device {
        Device::Cuda(7)
    }
    fn to_host(&self) -> Result<CpuStorage> {
        Ok(self.0.clone())
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
    fn duplicate(&self) -> Result<Box<dyn DeviceStorage>> {
        Ok(Box::new(self.clone()))
    }
}

struct FakeBackend;

impl Backend for FakeBackend {
    fn device(&self) -> Device {
        Device::Cuda(7)
    }
    fn upload(&self, host: &CpuStorage) -> Result<Box<dyn DeviceStorage>> {
        Ok(Box::new(FakeStorage(host.clone())))
    }
}

#[test]
fn mixing_devices_and_kernels_on_an_unsupported_device_are_errors() {
    register_backend(Arc::new(FakeBackend)).unwrap();
    let g = Tensor::ones(3, DType::F32, Device::Cuda(7)).unwrap();
    assert_eq!(g.to_vec::<f32>().unwrap(), vec![1.0; 3]);
    let e = t(&[3]).add(&g).unwrap_err();
    assert!(
        matches!(
            e,
            Error::DeviceMismatch {
                op: "add",
                lhs: Device::Cpu,
                rhs: Device::Cuda(7)
            }
        ),
        "{e:?}"
    );
    has_all(
        &e.to_string(),
        &["add", "device mismatch", "Cpu", "Cuda(7)"],
    );
    let e = g.exp().unwrap_err();
    assert!(matches!(e, Error::Device { op: "exp", .. }), "{e:?}");
    has_all(&e.to_string(), &["exp", "CPU storage", "Cuda(7)"]);
}

/// Hooks whose `before_op` refuses every op, as a memory manager over budget does.
#[derive(Default)]
struct Refuse {
    after: Mutex<Vec<&'static str>>,
}

impl MemoryHooks for Refuse {
    fn before_op(&self, event: &OpEvent<'_>) -> Result<()> {
        let requested = event.output_info().map(|(_, b, _)| b).sum();
        Err(Error::OutOfMemory {
            requested,
            budget: 8,
            msg: format!("{} needs {requested} bytes; resident: nothing", event.op),
        })
    }
    fn after_op(&self, event: &OpEvent<'_>) -> Result<()> {
        self.after.lock().unwrap().push(event.op);
        Ok(())
    }
}

#[test]
fn out_of_memory_from_the_hooks_propagates_unchanged() {
    let x = t(&[2, 3]).set_requires_grad(true);
    let hooks = Arc::new(Refuse::default());
    {
        let _g = install_memory_hooks(hooks.clone());
        let e = x.exp().unwrap_err();
        match &e {
            Error::OutOfMemory {
                requested: 24,
                budget: 8,
                msg,
            } => assert_eq!(msg, "exp needs 24 bytes; resident: nothing"),
            other => panic!("expected OutOfMemory, got {other:?}"),
        }
        has_all(&e.to_string(), &["out of memory", "exp needs 24 bytes"]);
        let e = x.sqr().and_then(|y| y.sum_all()).unwrap_err();
        assert!(matches!(e, Error::OutOfMemory { .. }), "{e:?}");
        // Views run no kernel and need no memory: they still work.
        assert!(x.t().is_ok());
    }
    assert!(
        hooks.after.lock().unwrap().is_empty(),
        "a refused op must not run"
    );
    // Uninstalled: ops run again.
    assert!(x.exp().is_ok());
}
