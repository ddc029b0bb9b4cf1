"""GET /metrics (SPEC section 6)."""

from __future__ import annotations

from app.metrics import WEBHOOK_RESULTS
from tests.support.clients import AppClient, MakeClient, message


def test_every_webhook_result_exists_from_start_up(client: AppClient) -> None:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    for result in ("created", "duplicate", "invalid_signature", "validation_error"):
        assert f'webhook_requests_total{{result="{result}"}} 0.0' in response.text
    for result in WEBHOOK_RESULTS:
        assert f'webhook_requests_total{{result="{result}"}}' in response.text


def test_the_feed_metrics_exist_from_start_up(client: AppClient) -> None:
    text = client.get("/metrics").text
    assert "\n# TYPE feed_subscribers gauge\nfeed_subscribers 0.0\n" in text
    assert "\n# TYPE feed_subscribers_dropped_total counter\n" in text
    assert "\nfeed_subscribers_dropped_total 0.0\n" in text


def test_every_outcome_is_counted(make_client: MakeClient) -> None:
    client = make_client(max_body_bytes=500)
    client.post_signed(message())
    client.post_signed(message())
    client.post_signed(message(), secret="wrong")
    client.post_signed(message(ts="yesterday"))
    client.post_signed(message(text="x" * 600))
    client.post_signed(message(), headers={"Content-Type": "text/plain"})
    expected = {
        "created": 1,
        "duplicate": 1,
        "invalid_signature": 1,
        "validation_error": 1,
        "payload_too_large": 1,
        "unsupported_media_type": 1,
        "storage_unavailable": 0,
    }
    for result, count in expected.items():
        assert client.metric("webhook_requests_total", result=result) == count, result
    assert client.metric("http_requests_total", path="/webhook", status="200") == 2
    assert client.metric("http_requests_total", path="/webhook", status="401") == 1
    assert client.metric("http_requests_total", path="/webhook", status="413") == 1
    assert client.metric("webhook_signature_key_total", key="current") == 4


def test_unknown_paths_share_one_label(client: AppClient) -> None:
    for path in ["/nope", "/wp-admin/setup.php", "/messages/../../etc/passwd", "/x" * 50]:
        assert client.get(path).status_code == 404
    text = client.get("/metrics").text
    assert 'http_requests_total{path="unmatched",status="404"} 4.0' in text
    assert "wp-admin" not in text
    assert "/nope" not in text


def test_route_template_labels_a_wrong_method(client: AppClient) -> None:
    response = client.get("/webhook")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert client.metric("http_requests_total", path="/webhook", status="405") == 1


def test_latency_histogram(client: AppClient) -> None:
    client.get("/health/live")
    client.get("/health/live")
    samples = dict(
        line.rsplit(" ", 1)
        for line in client.get("/metrics").text.splitlines()
        if line.startswith("request_latency_ms")
    )
    assert float(samples["request_latency_ms_count"]) >= 2
    assert samples['request_latency_ms_bucket{le="+Inf"}'] == samples["request_latency_ms_count"]
    assert float(samples["request_latency_ms_sum"]) > 0
    assert float(samples['request_latency_ms_bucket{le="0.5"}']) <= float(
        samples['request_latency_ms_bucket{le="10000.0"}']
    )


def test_each_app_has_its_own_registry(make_client: MakeClient) -> None:
    first = make_client()
    second = make_client()
    first.post_signed(message())
    assert first.metric("webhook_requests_total", result="created") == 1
    assert second.metric("webhook_requests_total", result="created") == 0


def test_request_durations_by_route_and_method_in_seconds(client: AppClient) -> None:
    client.post_signed(message())
    client.get("/messages")
    client.get("/messages")
    text = client.get("/metrics").text
    count = 'http_request_duration_seconds_count{method="%s",route="%s"}'
    assert count % ("POST", "/webhook") + " 1.0" in text
    assert count % ("GET", "/messages") + " 2.0" in text
    assert (
        'http_request_duration_seconds_bucket{le="0.0005",method="GET",route="/messages"}' in text
    )
    # An unusual method does not grow the label set.
    client.request("BREW", "/messages")
    assert count % ("other", "/messages") + " 1.0" in client.get("/metrics").text


def test_process_metrics_are_exposed(client: AppClient) -> None:
    text = client.get("/metrics").text
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds"):
        assert f"\n{name} " in text, name
    assert "python_gc_collections_total" in text
