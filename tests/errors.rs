//! One test per `Error` variant: each misuse returns its own variant with the numbers involved,
//! and its message names them.

use vera_kernels::baseline::{dense_backward, dense_forward, unfused_forward, DenseBuffers};
use vera_kernels::{
    delta_weight, forward, merge, Adapter, DType, Error, Gradients, Isa, LayerProjections, MatMut, MatRef, Mode,
    Projections,
};

fn proj() -> Projections<f32> {
    Projections::from_seed(0, 4, 10, 12).unwrap()
}

fn adapter(m: usize) -> Adapter {
    Adapter::new(vec![0.1; 4], vec![1.0; m]).unwrap()
}

#[test]
fn stride_too_small() {
    let e = MatRef::new(&[0.0f32; 12], 3, 4, 3).unwrap_err();
    assert_eq!(e, Error::StrideTooSmall { what: "matrix", cols: 4, row_stride: 3 });
    assert!(e.to_string().contains("row stride 3") && e.to_string().contains("columns 4"));
}

#[test]
fn buffer_too_small() {
    let mut data = [0.0f32; 10];
    let e = MatMut::new(&mut data, 3, 4, 4).unwrap_err();
    assert_eq!(e, Error::BufferTooSmall { what: "matrix", rows: 3, cols: 4, row_stride: 4, needed: 12, len: 10 });
    assert!(e.to_string().contains("needs 12") && e.to_string().contains("has 10"));
}

#[test]
fn size_overflow() {
    let e = MatRef::<f32>::new(&[], usize::MAX, 2, usize::MAX / 2).unwrap_err();
    assert!(matches!(e, Error::SizeOverflow { .. }), "{e:?}");
    let e = Projections::<f32>::from_arrays(vec![], vec![], usize::MAX, 3, 1).unwrap_err();
    assert!(matches!(e, Error::SizeOverflow { .. }), "{e:?}");
    let e = Projections::<f32>::from_seed(0, 16, usize::MAX / 8, 64).unwrap_err();
    assert_eq!(e, Error::SizeOverflow { what: "A = [r, n_max]" });
}

// Miri reports an allocation of 2^58 bytes as resource exhaustion instead of failing it.
#[cfg(not(miri))]
#[test]
fn out_of_memory() {
    // 2^56 elements fit usize but no machine's memory: an Err before anything is touched.
    let n_max = 1usize << 52;
    let e = Projections::<vera_kernels::bf16>::from_seed(0, 16, n_max, 64).unwrap_err();
    assert_eq!(e, Error::OutOfMemory { what: "A = [r, n_max]", bytes: 16 * n_max * 4 });
    assert!(e.to_string().starts_with("A = [r, n_max]: cannot allocate 288230376151711744 bytes"), "{e}");
    // The dense baseline's ΔW is [m, n]: far more than the projections it is formed from.
    let (n, m) = (1usize << 20, 1usize << 20);
    let p = Projections::<f32>::from_arrays(vec![0.0; n], vec![0.0; m], 1, n, m).unwrap();
    let a = Adapter::new(vec![1.0], vec![1.0; m]).unwrap();
    let x = vec![0.0f32; n];
    let mut y = vec![0.0f32; m];
    let e = dense_forward(
        &p,
        &a,
        MatRef::from_slice(&x, 1, n).unwrap(),
        MatMut::from_slice(&mut y, 1, m).unwrap(),
        Mode::Overwrite,
        &mut DenseBuffers::default(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::OutOfMemory { what, .. } if what.contains("ΔW")), "{e:?}");
    // Its backward's dΔW likewise, before a gradient is written.
    let (mut dld, mut dlb) = (vec![f32::NAN; 1], vec![f32::NAN; m]);
    let e = dense_backward(
        &p,
        &a,
        MatRef::from_slice(&x, 1, n).unwrap(),
        MatRef::from_slice(&y, 1, m).unwrap(),
        Gradients::new(&mut dld, &mut dlb),
        Mode::Overwrite,
        &mut DenseBuffers::default(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::OutOfMemory { what, .. } if what.contains("dΔW")), "{e:?}");
    assert!(dld[0].is_nan() && dlb.iter().all(|v| v.is_nan()), "a gradient was written");
}

#[test]
fn length_mismatch() {
    let e = Projections::<f32>::from_arrays(vec![0.0; 7], vec![0.0; 6], 2, 4, 3).unwrap_err();
    assert_eq!(e, Error::LengthMismatch { what: "A = [r, n_max]", expected: 8, actual: 7 });
    let e = Projections::<f32>::from_arrays(vec![0.0; 8], vec![0.0; 5], 2, 4, 3).unwrap_err();
    assert_eq!(e, Error::LengthMismatch { what: "B = [m_max, r]", expected: 6, actual: 5 });
    let e = adapter(5).with_bias(vec![0.0; 4]).unwrap_err();
    assert!(matches!(e, Error::LengthMismatch { expected: 5, actual: 4, .. }), "{e:?}");

    // lambda_b sized for another layer.
    let x = [0.0f32; 2 * 10];
    let mut y = [0.0f32; 2 * 12];
    let e = forward(
        &proj(),
        &adapter(11),
        MatRef::from_slice(&x, 2, 10).unwrap(),
        MatMut::from_slice(&mut y, 2, 12).unwrap(),
        Mode::Accumulate,
    )
    .unwrap_err();
    assert!(matches!(e, Error::LengthMismatch { expected: 12, actual: 11, .. }), "{e:?}");
    assert!(e.to_string().contains("expected length 12, got 11"));
}

#[test]
fn shape_mismatch() {
    let x = [0.0f32; 2 * 10];
    let mut y = [0.0f32; 3 * 12];
    let e = forward(
        &proj(),
        &adapter(12),
        MatRef::from_slice(&x, 2, 10).unwrap(),
        MatMut::from_slice(&mut y, 3, 12).unwrap(),
        Mode::Accumulate,
    )
    .unwrap_err();
    assert_eq!(e, Error::ShapeMismatch { what: "y (must be [T, out_features])", expected: [2, 12], actual: [3, 12] });

    let p = proj();
    let layer = p.slice(8, 12).unwrap();
    let mut y = [0.0f32; 2 * 12];
    let e = vera_kernels::forward_layer(
        layer,
        &adapter(12),
        MatRef::from_slice(&x, 2, 10).unwrap(),
        MatMut::from_slice(&mut y, 2, 12).unwrap(),
        Mode::Overwrite,
    )
    .unwrap_err();
    assert_eq!(e, Error::ShapeMismatch { what: "x (must be [T, in_features])", expected: [2, 8], actual: [2, 10] });

    let mut y3 = [0.0f32; 3 * 12];
    let e = dense_forward(
        &p,
        &adapter(12),
        MatRef::from_slice(&x, 2, 10).unwrap(),
        MatMut::from_slice(&mut y3, 3, 12).unwrap(),
        Mode::Overwrite,
        &mut DenseBuffers::default(),
    )
    .unwrap_err();
    assert_eq!(e, Error::ShapeMismatch { what: "y (must be [T, out_features])", expected: [2, 12], actual: [3, 12] });

    let mut h = [0.0f32; 2 * 3];
    let e = unfused_forward(
        &p,
        &adapter(12),
        MatRef::from_slice(&x, 2, 10).unwrap(),
        MatMut::from_slice(&mut h, 2, 3).unwrap(),
        MatMut::from_slice(&mut y, 2, 12).unwrap(),
        Mode::Overwrite,
    )
    .unwrap_err();
    assert_eq!(e, Error::ShapeMismatch { what: "h (must be [T, r])", expected: [2, 4], actual: [2, 3] });

    let e = MatRef::from_slice(&x, 2, 10).unwrap().top_left(3, 1).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { expected: [2, 10], actual: [3, 1], .. }), "{e:?}");
}

#[test]
fn rank_mismatch() {
    let x = [0.0f32; 10];
    let mut y = [0.0f32; 12];
    let wrong = Adapter::new(vec![0.1; 5], vec![1.0; 12]).unwrap();
    let e = forward(
        &proj(),
        &wrong,
        MatRef::from_slice(&x, 1, 10).unwrap(),
        MatMut::from_slice(&mut y, 1, 12).unwrap(),
        Mode::Accumulate,
    )
    .unwrap_err();
    assert_eq!(e, Error::RankMismatch { what: "lambda_d", expected: 4, actual: 5 });
    assert!(e.to_string().contains("rank 5") && e.to_string().contains("r = 4"));

    let a = [0.0f32; 4 * 3];
    let b = [0.0f32; 2 * 5];
    let e = LayerProjections::new(MatRef::from_slice(&a, 4, 3).unwrap(), MatRef::from_slice(&b, 2, 5).unwrap())
        .unwrap_err();
    assert_eq!(e, Error::RankMismatch { what: "B's columns", expected: 4, actual: 5 });
}

#[test]
fn zero_rank() {
    assert_eq!(Projections::<f32>::from_seed(0, 0, 4, 4).unwrap_err(), Error::ZeroRank);
    assert_eq!(Projections::<f32>::from_arrays(vec![], vec![], 0, 4, 4).unwrap_err(), Error::ZeroRank);
    assert_eq!(Adapter::new(vec![], vec![1.0]).unwrap_err(), Error::ZeroRank);
    let e =
        LayerProjections::<f32>::new(MatRef::from_slice(&[], 0, 3).unwrap(), MatRef::from_slice(&[], 2, 0).unwrap())
            .unwrap_err();
    assert_eq!(e, Error::ZeroRank);
}

#[test]
fn layer_exceeds_projections() {
    let x = [0.0f32; 11];
    let mut y = [0.0f32; 12];
    let e = forward(
        &proj(),
        &adapter(12),
        MatRef::from_slice(&x, 1, 11).unwrap(),
        MatMut::from_slice(&mut y, 1, 12).unwrap(),
        Mode::Accumulate,
    )
    .unwrap_err();
    assert_eq!(e, Error::LayerExceedsProjections { what: "in_features", layer: 11, max: 10 });
    assert!(e.to_string().contains("11") && e.to_string().contains("10"));

    let mut w = [0.0f32; 13 * 10];
    let e = merge(&proj(), &adapter(13), MatMut::from_slice(&mut w, 13, 10).unwrap()).unwrap_err();
    assert_eq!(e, Error::LayerExceedsProjections { what: "out_features", layer: 13, max: 12 });
    let e = delta_weight(&proj(), &adapter(13), MatMut::from_slice(&mut w, 13, 10).unwrap()).unwrap_err();
    assert_eq!(e, Error::LayerExceedsProjections { what: "out_features", layer: 13, max: 12 });
}

#[test]
fn unknown_dtype() {
    let e = "float64".parse::<DType>().unwrap_err();
    assert_eq!(e, Error::UnknownDType { name: "float64".into() });
    assert!(e.to_string().contains("f32, f16, bf16"));
}

#[test]
fn unknown_isa() {
    let e = "sse9".parse::<Isa>().unwrap_err();
    assert_eq!(e, Error::UnknownIsa { name: "sse9".into() });
    assert!(e.to_string().contains("avx512bf16, avx512, avx2, portable"));
    assert_eq!("portable".parse::<Isa>().unwrap(), Isa::Portable);
}

#[test]
fn cuda_errors_say_what_failed() {
    let e = Error::NoCudaDevice { reason: "the CUDA driver library (libcuda) cannot be loaded".into() };
    assert_eq!(e.to_string(), "no CUDA device: the CUDA driver library (libcuda) cannot be loaded");
    let e = Error::Cuda { operation: "launch vera_up_tile_bf16".into(), message: "out of memory".into() };
    assert_eq!(e.to_string(), "CUDA: launch vera_up_tile_bf16 failed: out of memory");
    let e = Error::DeviceMismatch { what: "x" };
    assert_eq!(e.to_string(), "x is on another CUDA device (or context) than the stream it was given to");
}
