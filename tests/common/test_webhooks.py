import time

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
