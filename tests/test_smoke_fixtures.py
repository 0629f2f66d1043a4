def test_tiny_encoder_run_folder(tiny_encoder):
    assert (tiny_encoder / "encoder.safetensors").is_file()
