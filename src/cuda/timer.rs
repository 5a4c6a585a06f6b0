//! Timing: [`StreamTimer`] measures the device time of work on one stream, and
//! [`CudaStream::measure_copy_gbps`] the device's memory bandwidth with it.

use crate::error::{Error, Result};

use super::buffer::Buffer;
#[cfg(feature = "cuda")]
use super::driver;
use super::{CudaStream, StreamKind};

/// Measures the device time of work issued on one stream: on a GPU with a pair of CUDA timing
/// events recorded around the work (so host-side time outside the stream's work is not counted,
/// but gaps in the stream while the host is still launching are); on the emulated device, which
/// runs work as it is issued, with the host clock. Made by [`CudaStream::timer`], reused for every
/// measurement.
pub struct StreamTimer<'s> {
    stream: &'s CudaStream,
    clock: TimerClock,
}

enum TimerClock {
    #[cfg(feature = "cuda")]
    Events(driver::TimingEvents),
    #[cfg(feature = "cuda-emulation")]
    Host,
}

impl std::fmt::Debug for StreamTimer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamTimer").field("stream", self.stream).finish()
    }
}

impl StreamTimer<'_> {
    /// Runs `work`, which must issue its work on this timer's stream, and returns the device time
    /// from the start of that work to its end, in milliseconds. Waits for the work to finish.
    ///
    /// Errors: whatever `work` returns, or [`Error::Cuda`] when an event cannot be recorded or read.
    pub fn time_ms(&mut self, work: impl FnOnce() -> Result<()>) -> Result<f64> {
        match (&self.clock, &self.stream.kind) {
            #[cfg(feature = "cuda")]
            (TimerClock::Events(events), StreamKind::Driver(stream)) => {
                events.record_start(stream)?;
                work()?;
                events.record_end(stream)?;
                events.elapsed_ms()
            }
            #[cfg(feature = "cuda-emulation")]
            (TimerClock::Host, StreamKind::Emulated) => {
                let start = std::time::Instant::now();
                work()?;
                Ok(start.elapsed().as_secs_f64() * 1e3)
            }
            // `CudaStream::timer` makes the clock of the stream's kind.
            #[allow(unreachable_patterns)]
            _ => Err(Error::DeviceMismatch { what: "timer" }),
        }
    }
}

impl CudaStream {
    /// A timer for work on this stream (see [`StreamTimer`]): how `vera bench --device cuda` times
    /// each call.
    ///
    /// Errors: [`Error::Cuda`] when the timing events cannot be created.
    pub fn timer(&self) -> Result<StreamTimer<'_>> {
        let clock = match &self.kind {
            #[cfg(feature = "cuda")]
            StreamKind::Driver(stream) => TimerClock::Events(driver::TimingEvents::new(stream)?),
            #[cfg(feature = "cuda-emulation")]
            StreamKind::Emulated => TimerClock::Host,
        };
        Ok(StreamTimer { stream: self, clock })
    }

    /// Measures this device's memory bandwidth with device-to-device copies of `bytes` bytes:
    /// `2 · bytes` (read and write) per copy over the median copy time (device events), in GB/s.
    /// The roofline that `vera bench --device cuda --peak` holds decode cases against.
    pub fn measure_copy_gbps(&self, bytes: usize) -> Result<f64> {
        let bytes = bytes.max(1 << 20);
        let src = Buffer::zeros(&self.kind, bytes)?;
        let mut dst = Buffer::zeros(&self.kind, bytes)?;
        let mut timer = self.timer()?;
        let mut times = Vec::new();
        for round in 0..12 {
            let ms = timer.time_ms(|| src.copy_to(&mut dst, &self.kind))?;
            // The first rounds warm the allocation and the clocks up.
            if round >= 2 {
                times.push(ms);
            }
        }
        times.sort_by(f64::total_cmp);
        Ok(2.0 * bytes as f64 / (times[times.len() / 2] * 1e-3) / 1e9)
    }
}
