//! `Tensor::on_grad_ready`: a leaf's hook runs once per backward pass, with the finished
//! gradient, as soon as the last edge that can deliver to it has been processed.

use dynn_core::GradHookHandle;
use dynn_ops::prelude::*;
use std::sync::{Arc, Mutex};

fn leaf(v: &[f64]) -> Result<Tensor> {
    Ok(Tensor::from_vec(v.to_vec(), v.len(), Device::Cpu)?.set_requires_grad(true))
}

/// The gradients a hook was called with, in order.
type Seen = Arc<Mutex<Vec<Vec<f64>>>>;

/// Records each call: the gradient's values.
fn recorder(t: &Tensor) -> Result<(Seen, GradHookHandle)> {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let handle = t.on_grad_ready(move |g| {
        s.lock().unwrap().push(g.to_vec::<f64>()?);
        Ok(())
    })?;
    Ok((seen, handle))
}

#[test]
fn a_leaf_used_twice_is_heard_once_with_its_total() -> Result<()> {
    let w = leaf(&[1.0, 2.0, 3.0])?;
    let x = leaf(&[0.5, -1.0, 2.0])?;
    let (seen_w, _hw) = recorder(&w)?;
    let (seen_x, _hx) = recorder(&x)?;
    // w is read by two ops: its hook must wait for both contributions.
    let y = w.mul(&x)?.exp()?.sum_all()?.add(&w.sqr()?.sum_all()?)?;
    y.backward()?;
    let seen_w = seen_w.lock().unwrap().clone();
    assert_eq!(seen_w.len(), 1, "one call per backward pass");
    assert_eq!(seen_w[0], w.grad().unwrap().to_vec::<f64>()?);
    let xs = x.to_vec::<f64>()?;
    let ws = w.to_vec::<f64>()?;
    for i in 0..3 {
        let want = xs[i] * (ws[i] * xs[i]).exp() + 2.0 * ws[i];
        assert!((seen_w[0][i] - want).abs() < 1e-12);
    }
    assert_eq!(seen_x.lock().unwrap().len(), 1);
    Ok(())
}

#[test]
fn the_hook_runs_while_the_pass_goes_on() -> Result<()> {
    // a is finished by the first node backward processes (the last recorded); b only at the
    // end. a's hook must run before b's gradient exists.
    let a = leaf(&[1.0, 2.0])?;
    let b = leaf(&[3.0, 4.0])?;
    let order: Arc<Mutex<Vec<(&str, bool)>>> = Arc::default();
    let (o, bb) = (order.clone(), b.clone());
    let _ha = a.on_grad_ready(move |_| {
        o.lock().unwrap().push(("a", bb.grad().is_some()));
        Ok(())
    })?;
    let o = order.clone();
    let _hb = b.on_grad_ready(move |_| {
        o.lock().unwrap().push(("b", true));
        Ok(())
    })?;
    let h = b.exp()?.tanh()?;
    let y = h.mul(&a)?.sum_all()?;
    y.backward()?;
    assert_eq!(*order.lock().unwrap(), vec![("a", false), ("b", true)]);
    Ok(())
}

#[test]
fn accumulating_passes_each_hear_the_running_total() -> Result<()> {
    let w = leaf(&[1.0, -2.0])?;
    let (seen, _h) = recorder(&w)?;
    w.sqr()?.sum_all()?.backward()?;
    w.sqr()?.sum_all()?.backward()?;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen, vec![vec![2.0, -4.0], vec![4.0, -8.0]]);
    Ok(())
}

#[test]
fn unreached_leaves_are_not_called_and_dropped_handles_are_gone() -> Result<()> {
    let w = leaf(&[1.0, 2.0])?;
    let unused = leaf(&[5.0])?;
    let (seen_unused, _hu) = recorder(&unused)?;
    let (seen, h) = recorder(&w)?;
    w.sum_all()?.backward()?;
    assert_eq!(seen.lock().unwrap().len(), 1);
    assert!(seen_unused.lock().unwrap().is_empty());
    drop(h);
    w.sum_all()?.backward()?;
    assert_eq!(
        seen.lock().unwrap().len(),
        1,
        "no call after the handle is dropped"
    );
    Ok(())
}

#[test]
fn a_failing_hook_ends_the_pass_with_its_error() -> Result<()> {
    let w = leaf(&[1.0])?;
    let _h = w.on_grad_ready(|_| Err(Error::invalid("test hook", "refused")))?;
    let e = w.sqr()?.sum_all()?.backward().unwrap_err();
    assert!(e.to_string().contains("refused"), "{e}");
    Ok(())
}

#[test]
fn only_leaves_that_require_grad_take_a_hook() -> Result<()> {
    let plain = Tensor::from_vec(vec![1.0f64], 1, Device::Cpu)?;
    let e = plain.on_grad_ready(|_| Ok(())).unwrap_err();
    assert!(e.to_string().contains("on_grad_ready"), "{e}");
    let inner = leaf(&[1.0])?.exp()?;
    assert!(inner.on_grad_ready(|_| Ok(())).is_err());
    Ok(())
}
