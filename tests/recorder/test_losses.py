"""Per-example loss functions: causal_lm_example_loss, and auto_loss / from_criterion on real models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import hf_tiny
from simfluence.recorder import auto_loss, causal_lm_example_loss, causal_lm_loss, from_criterion


def test_causal_lm_example_loss_matches_manual():
    torch.manual_seed(0)
    n, length, vocab = 4, 7, 11
    logits = torch.randn(n, length, vocab)
    labels = torch.randint(vocab, (n, length))
    labels[1, 5:] = -100
    mask = torch.ones(n, length, dtype=torch.long)
    mask[2, 4:] = 0
    got = causal_lm_example_loss(logits, labels, mask)
    for i in range(n):
        terms = [-torch.log_softmax(logits[i, j - 1], -1)[labels[i, j]] for j in range(1, length)
                 if labels[i, j] != -100 and mask[i, j] == 1]
        torch.testing.assert_close(got[i], torch.stack(terms).mean(), rtol=0, atol=1e-6)
    assert torch.isnan(causal_lm_example_loss(logits[:1], torch.full((1, length), -100))).all()


def _tiny_config(**extra):
    return dict(vocab_size=hf_tiny.VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=32, max_position_embeddings=32, **extra)


def test_auto_loss_by_output_type_equals_manual_losses():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    batch = hf_tiny.collate(hf_tiny.TEST)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]

    classifier = transformers.BertForSequenceClassification(transformers.BertConfig(**_tiny_config(num_labels=3))).eval()
    with torch.no_grad():
        manual = F.cross_entropy(classifier(input_ids=ids, attention_mask=mask).logits, labels, reduction="none")
        np.testing.assert_allclose(auto_loss(classifier, batch), manual, rtol=1e-6)
        np.testing.assert_allclose(from_criterion(torch.nn.CrossEntropyLoss(reduction="none"))(classifier, batch, None),
                                   manual, rtol=1e-6)
        # Regression head (num_labels=1): squared error.
        regressor = transformers.BertForSequenceClassification(transformers.BertConfig(**_tiny_config(num_labels=1)))
        targets = torch.linspace(-1, 1, len(labels))
        out = regressor.eval()(input_ids=ids, attention_mask=mask).logits[:, 0]
        np.testing.assert_allclose(auto_loss(regressor, {**batch, "labels": targets}), (out - targets) ** 2, rtol=1e-6)

        # Token classification: mean over each example's labelled, unpadded tokens.
        tagger = transformers.BertForTokenClassification(transformers.BertConfig(**_tiny_config(num_labels=4))).eval()
        tags = (ids % 4).masked_fill(mask == 0, -100)
        tags[:, 0] = -100
        logits = tagger(input_ids=ids, attention_mask=mask).logits
        expected = torch.stack([F.cross_entropy(logits[i][tags[i] != -100], tags[i][tags[i] != -100])
                                for i in range(len(ids))])
        np.testing.assert_allclose(auto_loss(tagger, {"input_ids": ids, "attention_mask": mask, "labels": tags}),
                                   expected, rtol=1e-5)

        # Causal LM: the same as causal_lm_loss.
        lm = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16,
                                                                  vocab_size=hf_tiny.VOCAB, n_positions=32,
                                                                  bos_token_id=1, eos_token_id=2)).eval()
        np.testing.assert_allclose(auto_loss(lm, {"input_ids": ids, "attention_mask": mask}),
                                   causal_lm_loss(lm, {"input_ids": ids, "attention_mask": mask}), rtol=1e-6)

    with pytest.raises(ValueError, match="no per-example loss is known for model outputs of type BaseModelOutput"):
        auto_loss(classifier.bert, {"input_ids": ids, "attention_mask": mask, "labels": labels})
