"""Settings from the environment, the error mapping and the dependencies, without starting a server."""

from __future__ import annotations

import os
import warnings

import pytest

import inference.settings
import serving.settings
from hndsr.images import ImageDecodeError, ImageTooLarge, UnsupportedFormat
from serving.app import create_app
from serving.errors import image_error
from serving.settings import Settings, SettingsError, env_name, load_settings
from serving.state import get_settings


@pytest.fixture
def env(monkeypatch):
    for name in [n for n in os.environ if n.startswith("HNDSR_") or n == "MODEL_URI"]:
        monkeypatch.delenv(name)
    return monkeypatch


def test_settings_come_from_the_documented_variables(env):
    assert load_settings() == Settings()
    env.setenv("MODEL_URI", "/models/exported")
    env.setenv("HNDSR_PASS_MEGAPIXELS", "0.5")
    env.setenv("HNDSR_TILE_OVERLAP", "4")
    env.setenv("HNDSR_POLL_S", "0")
    env.setenv("HNDSR_API_KEY", "")  # empty counts as unset
    settings = load_settings()
    assert (settings.model_uri, settings.pass_megapixels, settings.tile_overlap, settings.poll_s) == (
        "/models/exported", 0.5, 4, 0)
    assert (settings.max_batch, settings.precision, settings.compile) == ("auto", "auto", "auto")
    assert settings.api_key is None
    assert env_name("model_uri") == "MODEL_URI" and env_name("max_batch") == "HNDSR_MAX_BATCH"
    for field in Settings.model_fields:  # every setting is in its module's table: the engine's or the server's
        owner = inference.settings if field in inference.settings.EngineSettings.model_fields else serving.settings
        assert f"`{env_name(field)}`" in owner.__doc__, field


@pytest.mark.parametrize(("name", "value", "message"), [
    ("HNDSR_PASS_MEGAPIXELS", "big", "HNDSR_PASS_MEGAPIXELS='big': Input should be a valid number, unable to parse "
     "string as a number or 'auto'"),
    ("HNDSR_MAX_BATCH", "0", "HNDSR_MAX_BATCH='0': Input should be greater than 0 or 'auto'"),
    ("HNDSR_PRECISION", "bf16", "HNDSR_PRECISION='bf16': Input should be 'auto' or 'float32'"),
    ("HNDSR_POLL_S", "-1", "HNDSR_POLL_S='-1': Input should be greater than or equal to 0"),
    ("HNDSR_TILE_OVERLAP", "1", "HNDSR_TILE_OVERLAP='1': Input should be greater than or equal to 2"),
    ("HNDSR_MAX_QUEUE_PIXELS", "1000", "HNDSR_MAX_QUEUE_PIXELS must be at least HNDSR_MAX_OUTPUT_PIXELS"),
])
def test_a_bad_setting_names_its_variable(env, name, value, message):
    env.setenv(name, value)
    with pytest.raises(SettingsError) as error:
        load_settings()
    assert str(error.value).startswith(message)


@pytest.mark.parametrize(("error", "status", "code"), [
    (ImageTooLarge("too many pixels: 9000x9000 is above the limit of 4000000"), 413, "input_too_large"),
    (UnsupportedFormat("unsupported format GIF"), 415, "unsupported_image"),
    (ImageDecodeError("corrupt or truncated image data"), 400, "bad_image"),
])
def test_each_kind_of_undecodable_image_has_one_status(error, status, code):
    answer = image_error(error)
    assert (answer.status, answer.code) == (status, code)
    assert answer.detail.startswith(str(error))


def test_settings_reach_the_routers_through_a_dependency_tests_can_override(env):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # starlette's note about its httpx-based test client
        from fastapi.testclient import TestClient

    app = create_app(Settings())
    app.dependency_overrides[get_settings] = lambda: Settings(api_key="s3cret")
    client = TestClient(app)  # no `with`: the lifespan (model loading) does not run
    refused = client.get("/v1/model")
    assert refused.status_code == 401 and refused.json()["error"] == "unauthorized"
    allowed = client.get("/v1/model", headers={"Authorization": "Bearer s3cret"})
    assert allowed.status_code == 503 and allowed.json()["error"] == "not_ready"  # no model loaded yet
    assert client.get("/readyz").json() == {"status": "loading"}
