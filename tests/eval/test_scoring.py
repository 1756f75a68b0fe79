from seqtool.eval.scoring import exact_match, normalize_answer, stop_token_ids


def test_exact_match_on_hand_made_outputs():
    assert exact_match(" 12345", "12345") == 1.0
    assert exact_match(" 12345.\nWhat else", "12345") == 1.0
    assert exact_match("12345 ", "12345") == 1.0
    assert exact_match(" 1234", "12345") == 0.0
    assert exact_match(" 123456", "12345") == 0.0
    assert exact_match(" 12345 is it", "12345") == 0.0
    assert exact_match("", "12345") == 0.0
    assert exact_match(" ABCDE  FGHIJ KLMNO", "ABCDE FGHIJ KLMNO") == 1.0
    assert exact_match(" ABCDE KLMNO FGHIJ", "ABCDE FGHIJ KLMNO") == 0.0
    assert normalize_answer("  7654321.\n") == "7654321"


def test_stop_tokens(byte_tok):
    stops = stop_token_ids(byte_tok)
    assert byte_tok.eos_token_id in stops
    assert byte_tok.encode("\n", add_special_tokens=False)[0] in stops
    assert byte_tok.encode("7", add_special_tokens=False)[0] not in stops
