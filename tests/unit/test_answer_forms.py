"""logit-diff's two tokens are in the form of the token the model produced."""

from mmlens.experiments.answer_forms import paired_tokens


class SpacedTokenizer:
    """Words with a sentencepiece word-start mark when a space precedes them."""

    def __init__(self, words):
        pieces = [p for w in words for c in (w.lower(), w.capitalize()) for p in (c, "\u2581" + c)]
        self.ids = {piece: i for i, piece in enumerate(pieces)}
        self.pieces = {i: piece for piece, i in self.ids.items()}

    def __call__(self, text, add_special_tokens=False):
        spaced = text.replace(" ", " \u2581").split()
        return {"input_ids": [self.ids[w] for w in spaced]}

    def convert_ids_to_tokens(self, token):
        return self.pieces[token]

    def decode(self, tokens):
        return "".join(self.pieces[t] for t in tokens).replace("\u2581", " ")


def test_the_wrong_option_takes_the_case_and_space_of_the_produced_token():
    tokenizer = SpacedTokenizer(["red", "green"])
    ids = tokenizer.ids
    for produced in ("Red", "red", "\u2581Red", "\u2581red"):
        answer, foil = paired_tokens(tokenizer, ids[produced], "red", "green")
        assert answer == ids[produced]
        assert tokenizer.convert_ids_to_tokens(foil) == produced.replace("Red", "Green").replace(
            "red", "green")


def test_without_the_filter_the_answer_is_the_gold_answer_never_the_wrong_option():
    tokenizer = SpacedTokenizer(["red", "green", "blue"])
    ids = tokenizer.ids
    # the model said the wrong option (or something else): the answer is still gold's token
    for produced, answer_piece, foil_piece in (("Green", "Red", "Green"),
                                                ("\u2581green", "\u2581red", "\u2581green"),
                                                ("\u2581Blue", "\u2581Red", "\u2581Green")):
        answer, foil = paired_tokens(tokenizer, ids[produced], "red", "green")
        assert (tokenizer.convert_ids_to_tokens(answer),
                tokenizer.convert_ids_to_tokens(foil)) == (answer_piece, foil_piece)
    assert paired_tokens(tokenizer, ids["Red"], "red", None) == (ids["Red"], None)
    assert paired_tokens(tokenizer, ids["Red"], "red", "Red") == (ids["Red"], None)  # no difference
