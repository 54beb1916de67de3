import pytest
from pydantic import ValidationError

from models.settings import Settings


def test_embedded_defaults_need_no_server(tmp_path):
    settings = Settings(data_dir=tmp_path)
    assert settings.sqlalchemy_url == f"sqlite:///{tmp_path / 'rewardranker.db'}"
    assert settings.celery_broker_url == "filesystem://"
    assert settings.broker_folder == tmp_path / "broker"


def test_api_off_loopback_requires_a_token():
    with pytest.raises(ValidationError, match="RR_API_TOKEN"):
        Settings(api_host="0.0.0.0")
    assert Settings(api_host="0.0.0.0", api_token="s3cret").api_token.get_secret_value() == "s3cret"
    assert Settings(api_host="::1").api_token is None


def test_unknown_database_scheme_is_refused():
    with pytest.raises(ValidationError, match="RR_DATABASE_URL"):
        Settings(database_url="mysql://x")


def test_environment_prefix(monkeypatch):
    monkeypatch.setenv("RR_RETRAIN_THRESHOLD", "5")
    assert Settings().retrain_threshold == 5
