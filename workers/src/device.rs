//! Device selection: worker `w` takes GPU `w mod n`; without CUDA (or when the
//! build lacks the `cuda` feature) it falls back to the CPU and says so.

use candle_core::Device;

/// Picks the device for a worker. `preference` is `auto`, `cpu` or `cuda`.
/// Returns the device and a human-readable line for the worker's log.
pub fn select(preference: &str, worker_index: usize) -> (Device, String) {
    match preference {
        "cpu" => (
            Device::Cpu,
            format!("worker {worker_index}: device cpu (configured)"),
        ),
        _ => {
            if candle_core::utils::cuda_is_available() {
                let count = cuda_device_count();
                let ordinal = worker_index % count.max(1);
                match Device::new_cuda(ordinal) {
                    Ok(d) => return (d, format!("worker {worker_index}: device cuda:{ordinal} of {count}")),
                    Err(e) => {
                        return (
                            Device::Cpu,
                            format!("worker {worker_index}: WARNING cuda:{ordinal} failed ({e}); falling back to cpu"),
                        )
                    }
                }
            }
            let why = if preference == "cuda" {
                "WARNING device `cuda` requested but this build has no CUDA support (build with --features cuda) or no GPU is visible; falling back to cpu"
            } else {
                "device cpu (no GPU available)"
            };
            (Device::Cpu, format!("worker {worker_index}: {why}"))
        }
    }
}

fn cuda_device_count() -> usize {
    // CUDA_VISIBLE_DEVICES narrows what the process sees; count its entries,
    // else probe ordinals until one fails.
    if let Ok(v) = std::env::var("CUDA_VISIBLE_DEVICES") {
        let n = v.split(',').filter(|s| !s.trim().is_empty()).count();
        if n > 0 {
            return n;
        }
    }
    let mut n = 0;
    while n < 64 && Device::new_cuda(n).is_ok() {
        n += 1;
    }
    n.max(1)
}
