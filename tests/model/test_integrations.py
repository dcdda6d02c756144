"""The stock tools: peft LoRA on the thinking blocks and the attention, and torch.compile of the tick."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny import tiny_model


def test_peft_lora_trains_generates_saves_and_merges(tmp_path):
    model = tiny_model(ctm_carry="chunk", ctm_chunk_size=2, ctm_readout="last")
    ids = torch.randint(1, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "out_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, lora)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any(".thinking.q_proj.lora_A" in n for n in trainable)  # the CTM's own query projection is adapted too
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(peft_model.get_parameter(n).grad is not None for n in trainable)

    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
        generated = peft_model.generate(input_ids=ids[:, :3], max_new_tokens=5, do_sample=False, pad_token_id=0)
    peft_model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    reloaded = PeftModel.from_pretrained(
        tiny_model(ctm_carry="chunk", ctm_chunk_size=2, ctm_readout="last"), tmp_path / "adapter"
    )
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, adapted)
        merged = reloaded.merge_and_unload()
        torch.testing.assert_close(merged(ids).logits, adapted, rtol=1e-4, atol=1e-5)
        assert torch.equal(merged.generate(ids[:, :3], max_new_tokens=5, do_sample=False, pad_token_id=0), generated)


@pytest.mark.parametrize("carry", [dict(), dict(ctm_carry="chunk", ctm_chunk_size=3)])
def test_compiled_ticks_give_the_same_outputs_and_gradients(carry):
    ids = torch.randint(1, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    eager = tiny_model(**carry).train()
    compiled = tiny_model(**carry).train()
    compiled.compile_ticks(backend="aot_eager", fullgraph=True)
    out_eager, out_compiled = eager(ids, labels=ids), compiled(ids, labels=ids)
    torch.testing.assert_close(out_compiled.logits, out_eager.logits)
    out_eager.loss.backward()
    out_compiled.loss.backward()
    for (name, p), (_, q) in zip(eager.named_parameters(), compiled.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
