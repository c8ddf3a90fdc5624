"""Prometheus metrics of one server (prometheus_client, a registry per engine so that several
servers in one process, as in tests, do not collide). Names follow vLLM's where one exists
(`..._time_to_first_token_seconds`, `..._time_per_output_token_seconds`), prefixed `dsv3_`.
Speculative decoding (§5.4.3) exports drafts proposed / accepted per draft position, so the
acceptance rate per position is accepted / proposed; prefill/decode disaggregation exports the
latent-cache bytes handed from prefill to decode."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LAT = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServeMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.queue_depth = Gauge("dsv3_queue_depth", "requests waiting for admission", registry=r)
        self.running = Gauge("dsv3_running_sequences", "sequences in the decode batch", registry=r)
        self.cache_used = Gauge("dsv3_cache_blocks_used", "latent-cache blocks held by sequences", registry=r)
        self.cache_total = Gauge("dsv3_cache_blocks_total", "latent-cache blocks in the pool", registry=r)
        self.ttft = Histogram("dsv3_time_to_first_token_seconds", "arrival to first token", buckets=_LAT, registry=r)
        self.tpot = Histogram("dsv3_time_per_output_token_seconds", "time between output tokens", buckets=_LAT,
                              registry=r)
        self.e2e = Histogram("dsv3_e2e_request_latency_seconds", "arrival to finish", buckets=_LAT, registry=r)
        self.prompt_tokens = Counter("dsv3_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("dsv3_generation_tokens", "tokens generated", registry=r)
        self.requests = Counter("dsv3_requests", "finished requests", ["finish_reason"], registry=r)
        self.rejected = Counter("dsv3_rejected_requests", "requests refused (429: queue full)", registry=r)
        self.steps = Counter("dsv3_decode_steps", "decode iterations", registry=r)
        self.spec_proposed = Counter("dsv3_spec_draft_tokens", "draft tokens verified, by draft position",
                                     ["position"], registry=r)
        self.spec_accepted = Counter("dsv3_spec_accepted_tokens", "draft tokens accepted, by draft position",
                                     ["position"], registry=r)
        self.pd_bytes = Counter("dsv3_pd_transfer_bytes", "latent-cache bytes handed from prefill to decode",
                                registry=r)
        self.pd_transfers = Counter("dsv3_pd_transfers", "prefilled sequences handed to decode", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def spec_acceptance(self) -> dict[int, float]:
        """Acceptance rate per draft position (1-based) so far."""
        out = {}
        for s in self.spec_proposed.collect()[0].samples:
            if s.name.endswith("_total") and s.value:
                pos = s.labels["position"]
                out[int(pos)] = self.spec_accepted.labels(position=pos)._value.get() / s.value
        return dict(sorted(out.items()))
