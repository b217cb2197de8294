"""Metric values against hand computation (English and Chinese; empty, all wrong, all right, partial)."""

import math

import pytest

from chattune.errors import ConfigError
from chattune.evaluate.metrics import bleu4, compute_metrics, exact, parse_metric_names, rouge_scores, triple_prf, \
    triples, words

approx = lambda x: pytest.approx(x, abs=1e-4)  # noqa: E731  (rouge-chinese subtracts a 1e-8 epsilon)


def test_jieba_words():
    assert words("我是甄嬛，家父是大理寺少卿") == ["我", "是", "甄", "嬛", "，", "家父", "是", "大理寺", "少卿"]


def test_rouge_english_partial():
    # unigram sets {the,cat,sat} vs {the,cat,sat,on,mat}: P=1, R=3/5; bigrams 2 of 5; LCS 3 of 6 tokens
    s = rouge_scores("the cat sat", "the cat sat on the mat")
    assert s == {"rouge-1": approx(75.0), "rouge-2": approx(100 * 2 * 0.4 / 1.4), "rouge-l": approx(200 / 3)}


def test_rouge_chinese_partial():
    # words 我 是 甄 嬛 vs 9 words (8 distinct): R-1 P=1 R=4/8; R-2 3 of 8 bigrams; LCS 4 of 9 -> F = 8/13
    s = rouge_scores("我是甄嬛", "我是甄嬛，家父是大理寺少卿")
    assert s == {"rouge-1": approx(200 / 3), "rouge-2": approx(100 * 0.75 / 1.375), "rouge-l": approx(800 / 13)}


def test_bleu_brevity_penalty_only():
    # every n-gram of the prediction is in the reference: BLEU = brevity penalty exp(1 - ref/pred)
    assert bleu4("the cat sat", "the cat sat on the mat") == approx(math.exp(1 - 11 / 5))  # jieba keeps spaces
    assert bleu4("我是甄嬛", "我是甄嬛，家父是大理寺少卿") == approx(math.exp(1 - 9 / 4))


@pytest.mark.parametrize("text", ["我是甄嬛，家父是大理寺少卿。", "The answer is 42, as always."])
def test_all_right(text):
    assert rouge_scores(text, text) == {"rouge-1": approx(100), "rouge-2": approx(100), "rouge-l": approx(100)}
    assert bleu4(text, text) == approx(1) and exact(text, " " + text + "\n") == 100


# ("alpha beta" vs "gamma delta" would share jieba's " " word: the demo's words keep white space, so do we)
@pytest.mark.parametrize("pred,ref", [("完全不同", "风扇低速"), ("alpha", "gamma")])
def test_all_wrong(pred, ref):
    assert rouge_scores(pred, ref) == {"rouge-1": 0, "rouge-2": 0, "rouge-l": 0}
    assert bleu4(pred, ref) == 0 and exact(pred, ref) == 0


@pytest.mark.parametrize("pred,ref", [("", "风扇低速"), ("answer", ""), ("  ", "x"), ("", "")])
def test_empty_scores_zero_and_never_crashes(pred, ref):
    assert rouge_scores(pred, ref) == {"rouge-1": 0, "rouge-2": 0, "rouge-l": 0}
    assert bleu4(pred, ref) == 0


def test_triples_parse_lines_of_three_parts():
    assert triples("发动机_部件故障_水温高\n风扇_部件故障_低速转动\n不是三元组\na_b\na_b_c_d\n_x_y") == {
        ("发动机", "部件故障", "水温高"), ("风扇", "部件故障", "低速转动")}


def test_triple_f1_per_sample_and_macro():
    assert triple_prf("A_r_B\nC_r_D\njunk", "A_r_B\nE_r_F") == (0.5, 0.5, 0.5)
    assert triple_prf("A_r_B", "A_r_B") == (1.0, 1.0, 1.0)
    assert triple_prf("", "A_r_B") == (0.0, 0.0, 0.0) and triple_prf("A_r_B", "") == (0.0, 0.0, 0.0)
    # macro over the real number of samples: (0.5 + 1 + 0) / 3
    m = compute_metrics(["triple_f1"], ["A_r_B\nC_r_D", "X_y_Z", ""], ["A_r_B\nE_r_F", "X_y_Z", "Q_r_S"])
    assert m == {"triple_p": approx(50.0), "triple_r": approx(50.0), "triple_f1": approx(50.0)}


def test_compute_metrics_means_over_samples():
    m = compute_metrics(["exact", "bleu"], ["我是甄嬛", "b"], ["我是甄嬛", "c"])
    assert m["exact"] == 50.0 and m["bleu-4"] == approx(0.5)  # (1 + 0) / 2: bleu-4 unscaled, as GLM-4's demo


def test_metric_names_are_checked():
    assert parse_metric_names("rouge, bleu,rouge") == ["rouge", "bleu"]
    with pytest.raises(ConfigError, match="unknown metric.*rogue.*choose from rouge, bleu"):
        parse_metric_names("rogue")
