"""A new home's Prefect database starts from a template migrated before, and never replaces one a run has open."""

from flows.run import _from_template


def _template(tmp_path):
    template = tmp_path / "template"
    template.mkdir()
    (template / "prefect.db").write_text("migrated")
    (template / "memo_store.toml").write_text("registered")
    return template


def test_a_new_home_starts_from_the_template(tmp_path):
    home = tmp_path / "home" / "prefect"
    _from_template(_template(tmp_path), home)
    assert (home / "prefect.db").read_text() == "migrated"
    assert (home / "memo_store.toml").read_text() == "registered"
    assert sorted(p.name for p in home.iterdir()) == ["memo_store.toml", "prefect.db"]  # no partial copy left


def test_a_database_another_run_made_first_is_kept(tmp_path):
    home = tmp_path / "home" / "prefect"
    home.mkdir(parents=True)
    (home / "prefect.db").write_text("in use")
    _from_template(_template(tmp_path), home)
    assert (home / "prefect.db").read_text() == "in use"
    assert sorted(p.name for p in home.iterdir()) == ["prefect.db"]
