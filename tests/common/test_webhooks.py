import time

import pytest

from common import webhooks

# The example in the Standard Webhooks specification.
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def test_signature_matches_the_specification_example():
    body = b'{"test": 2432232314}'
    assert webhooks.sign(SECRET, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == (
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )


def test_verify_round_trip_and_tampering():
    body = b'{"a":1}'
    h = webhooks.headers(SECRET, "job.succeeded", body)
    assert webhooks.verify(SECRET, h, body)
    assert not webhooks.verify(SECRET, h, b'{"a":2}')
    assert not webhooks.verify(SECRET, {**h, "webhook-id": "other"}, body)
    old = webhooks.headers(SECRET, "x", body, now=time.time() - 3600)
    assert not webhooks.verify(SECRET, old, body)  # replayed too late


@pytest.mark.parametrize(
    "url,reason",
    [
        ("http://127.0.0.1:9/hook", "non-public"),
        ("http://localhost/hook", "non-public"),
        ("http://10.1.2.3/hook", "non-public"),
        ("http://192.168.0.10/hook", "non-public"),
        ("http://169.254.169.254/latest/meta-data", "non-public"),  # cloud metadata
        ("http://[::1]/hook", "non-public"),
        ("ftp://example.com/x", "http or https"),
        ("http://no-such-host.invalid/hook", "does not resolve"),
    ],
)
def test_private_and_odd_targets_are_refused(url, reason):
    with pytest.raises(webhooks.WebhookError, match=reason):
        webhooks.check_url(url, allow_private=False)


def test_public_addresses_pass_and_private_ones_when_allowed():
    webhooks.check_url("https://93.184.215.14/hook", allow_private=False)
    webhooks.check_url("http://127.0.0.1:9/hook", allow_private=True)
