//! Prometheus metrics at `GET /metrics` (text exposition format): queue depth and running
//! jobs, requests by API and outcome, seconds per stage, model load seconds per device, and
//! GPU memory (absent on the CPU backends, which have no device memory of their own).

use crate::pipeline::stages::StageId;
use crate::runtime::Backend;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    api: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    stage: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeviceLabels {
    device: usize,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LoadLabels {
    device: usize,
    part: &'static str,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// Every metric the server keeps.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    queue_depth: Gauge,
    running: Gauge,
    stage_seconds: Family<StageLabels, Histogram>,
    load_seconds: Family<LoadLabels, FloatGauge>,
    gpu_free: Family<DeviceLabels, Gauge>,
    gpu_total: Family<DeviceLabels, Gauge>,
}

/// From 50 ms to about 30 minutes: a tiny model's stage on the CPU to a 6K stage C.
fn stage_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.05, 2.0, 16))
}

impl Metrics {
    pub(super) fn new() -> Metrics {
        let mut registry = Registry::with_prefix("upx");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Generation requests by API and outcome (ok, bad_request, unauthorized, \
             queue_full, not_ready, cancelled, failed)",
            requests.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "queue_depth",
            "Jobs waiting for a device",
            queue_depth.clone(),
        );
        let running = Gauge::default();
        registry.register("jobs_running", "Jobs running on a device", running.clone());
        let stage_seconds =
            Family::<StageLabels, Histogram>::new_with_constructor(stage_histogram as fn() -> _);
        registry.register_with_unit(
            "stage",
            "Time of each stage of each image (the text encoder once per request)",
            Unit::Seconds,
            stage_seconds.clone(),
        );
        let load_seconds = Family::<LoadLabels, FloatGauge>::default();
        registry.register_with_unit(
            "load",
            "Start-up time per device: backend open (CUDA init) and model load",
            Unit::Seconds,
            load_seconds.clone(),
        );
        let gpu_free = Family::<DeviceLabels, Gauge>::default();
        registry.register_with_unit(
            "gpu_memory_free",
            "Free GPU memory (CUDA backend only)",
            Unit::Bytes,
            gpu_free.clone(),
        );
        let gpu_total = Family::<DeviceLabels, Gauge>::default();
        registry.register_with_unit(
            "gpu_memory_total",
            "Total GPU memory (CUDA backend only)",
            Unit::Bytes,
            gpu_total.clone(),
        );
        Metrics {
            registry,
            requests,
            queue_depth,
            running,
            stage_seconds,
            load_seconds,
            gpu_free,
            gpu_total,
        }
    }

    pub fn outcome(&self, api: &'static str, outcome: &'static str) {
        self.requests
            .get_or_create(&RequestLabels { api, outcome })
            .inc();
    }

    pub fn stage_timings(&self, timings: &[(StageId, f64)]) {
        for &(stage, seconds) in timings {
            let stage = stage_label(stage);
            self.stage_seconds
                .get_or_create(&StageLabels { stage })
                .observe(seconds);
        }
    }

    pub fn load_seconds(&self, device: usize, part: &'static str, seconds: f64) {
        self.load_seconds
            .get_or_create(&LoadLabels { device, part })
            .set(seconds);
    }

    /// The exposition text, with the gauges read now.
    pub fn render(&self, depth: usize, running: usize, backends: &[Backend]) -> String {
        self.queue_depth.set(depth as i64);
        self.running.set(running as i64);
        for (device, backend) in backends.iter().enumerate() {
            if let Backend::Cuda(d) = backend {
                if let Ok((free, total)) = d.memory() {
                    let labels = DeviceLabels { device };
                    self.gpu_free.get_or_create(&labels).set(free as i64);
                    self.gpu_total.get_or_create(&labels).set(total as i64);
                }
            }
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// A stage as a label value (no spaces).
fn stage_label(stage: StageId) -> &'static str {
    match stage {
        StageId::TextEncoder => "text_encoder",
        StageId::ControlNet => "controlnet",
        StageId::StageC => "stage_c",
        StageId::StageB => "stage_b",
        StageId::StageA => "stage_a",
    }
}
