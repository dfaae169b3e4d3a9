"""What the experiments iterate over: examples prepared one at a time, with extra spans.

``ExampleSource`` takes dataset ``Example`` records (each prepared only when reached, so a
long run holds one image at a time) or a ready ``MultimodalBatch``, and hands out unpadded
single-example batches.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mmlens.experiments.engine import single_example
from mmlens.inputs.batch import MultimodalBatch
from mmlens.model.protocol import HookedModel


class ExampleSource:
    """Examples by index: id, task, gold answer and the prepared single-example batch."""

    def __init__(self, model: HookedModel, examples: Sequence[Any] | MultimodalBatch,
                 spans: Mapping[str, Mapping[str, Any]] | Callable[..., Any] | None = None,
                 **prepare_options: Any):
        self.model = model
        # passed to prepare: template, preprocessing, tokenization, related_rule
        self.prepare_options = prepare_options
        self.image_sizes: dict[int, tuple[int, int]] = {}
        self.batch = examples if isinstance(examples, MultimodalBatch) else None
        if self.batch is not None:
            self.records = list(self.batch.examples) if self.batch.examples else None
            n = len(self.batch)
        else:
            self.records = list(examples)
            n = len(self.records)
        if n == 0:
            raise ValueError("no examples given: pass at least one example")
        self.ids = ([str(r.example_id) for r in self.records] if self.records is not None
                    else [str(i) for i in range(n)])
        repeated = sorted({i for i in self.ids if self.ids.count(i) > 1})
        if repeated:
            raise ValueError(f"example ids {repeated[:5]} occur more than once: give every "
                             "example its own example_id")
        self.extra_spans = spans
        self._last: tuple[int, MultimodalBatch] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def example_id(self, index: int) -> str:
        return self.ids[index]

    def task(self, index: int) -> str:
        return str(getattr(self.records[index], "task", "")) if self.records else ""

    def gold(self, index: int) -> str:
        return str(self.records[index].answer)

    def check_gold_answers(self) -> None:
        """Refuse the correctness filter where it cannot run."""
        if self.records is None or not all(hasattr(r, "answer") for r in self.records):
            raise ValueError("only_correct=True needs gold answers: pass Example records (or a "
                             "batch from prepare_examples), or set only_correct=False")
        if self.model.tokenizer is None:
            raise ValueError("only_correct=True decodes the model's answer, but this model has "
                             "no tokenizer: load it with from_pretrained, or only_correct=False")

    def prepare(self, index: int) -> MultimodalBatch:
        """Example ``index`` as an unpadded batch of one, extra spans added."""
        if self._last is not None and self._last[0] == index:
            return self._last[1]
        if self.batch is not None:
            example = single_example(self.batch, index)
        else:
            from mmlens.inputs.prepare import prepare

            record = self.records[index]
            image = record.load_image()
            self.image_sizes[index] = image.size
            example = single_example(prepare(
                self.model, [image], [record.question], boxes=[record.boxes_for(image.size)],
                examples=[record],
                **self.prepare_options))
        example = example.to(self.model.embed.W_E.device)
        self._add_extra_spans(index, example)
        self._last = (index, example)
        return example

    def _add_extra_spans(self, index: int, example: MultimodalBatch) -> None:
        if self.extra_spans is None:
            return
        if callable(self.extra_spans):
            record = self.records[index] if self.records else None
            extra = self.extra_spans(record, example.spans[0])
        else:
            extra = self.extra_spans.get(self.ids[index], {})
        if not isinstance(extra, Mapping):
            raise TypeError(f"extra spans for example {self.ids[index]!r} must be a mapping "
                            f"{{name: positions}}, got {type(extra).__name__}")
        for name, positions in extra.items():
            example.add_span(name, [positions])

    def digests(self) -> dict[str, Any]:
        """Digests of the examples' ids, questions, answers, tasks, boxes and image bytes."""
        from mmlens.experiments.runfolder.fingerprint import examples_digests

        return examples_digests(self.records, self.ids, self.batch)
