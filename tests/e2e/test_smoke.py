from tests.helpers import fsck


def test_push_then_clone(owner, app, server, tmp_path):
    work = owner.new_repo(tmp_path / "work")
    owner.git("push", "-q", owner.url(app), "main", cwd=work)
    owner.git("clone", "-q", owner.url(app, "scp"), str(tmp_path / "copy"))
    assert (tmp_path / "copy" / "README").read_text() == "hello\n"
    fsck(server.repo(app))
