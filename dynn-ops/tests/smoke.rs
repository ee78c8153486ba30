use dynn_ops::prelude::*;

#[test]
fn exp_mul_sum_backward() -> Result<()> {
    let x = Tensor::from_vec(
        vec![0.5f64, -1.0, 2.0, 0.25, 1.5, -0.75],
        (2, 3),
        Device::Cpu,
    )?
    .set_requires_grad(true);
    let w = Tensor::from_vec(vec![1.0f64, 2.0, 3.0], 3, Device::Cpu)?;
    let y = x.exp()?.mul(&w)?.sum_all()?;
    y.backward()?;
    let g = x.grad().expect("grad").to_vec::<f64>()?;
    let xs = x.to_vec::<f64>()?;
    for (i, (gi, xi)) in g.iter().zip(&xs).enumerate() {
        let want = xi.exp() * [1.0, 2.0, 3.0][i % 3];
        assert!((gi - want).abs() < 1e-12, "{i}: {gi} vs {want}");
    }
    let t = x.t()?.contiguous()?.max_dims(&[1], false)?;
    assert_eq!(t.dims(), &[3]);
    Ok(())
}
