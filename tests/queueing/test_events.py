from __future__ import annotations

from queueing import events


def test_events_round_trip_through_the_wire() -> None:
    sent: list[events.AnyEvent] = [
        events.Started(attempt=1, worker="w", prompt_tokens=3),
        events.Delta(attempt=1, text="héllo"),
        events.Finished(attempt=2, finish_reason="length", prompt_tokens=3, completion_tokens=4, text="x"),
        events.Failed(attempt=1, code=events.ErrorCode.UNSUPPORTED_VALUE, message="m", param="p"),
    ]
    assert [events.decode(events.encode(e)) for e in sent] == sent
    assert [events.decode(events.encode(e).encode()) for e in sent] == sent


def test_logprobs_and_embeddings_round_trip() -> None:
    top = [events.TopLogprob(token="a", logprob=-0.1)]
    sent: list[events.AnyEvent] = [
        events.Delta(attempt=1, text="a", logprobs=[events.TokenLogprob(token="a", logprob=-0.1, top=top)]),
        events.Finished(
            attempt=1, finish_reason="stop", prompt_tokens=2, completion_tokens=0, embeddings=[[0.25, -1.0]]
        ),
    ]
    assert [events.decode(events.encode(e)) for e in sent] == sent
