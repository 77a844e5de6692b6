"""What the studio needs from the API (issue 18): the caller's sessions (a gallery, tenants kept
apart), what the render workers can run (``GET /limits``), a job that says no worker serves its
queue, an empty layout rendered as its background, and a revision that starts from the layout
the user rendered. In-process API, a private Redis, no workers (jobs stay queued) unless a test
registers one."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from jobs.records import JobRecord, SessionRecord, new_id, utcnow
from jobs.store import Store
from layout_planner import Layout, Planner, Turn
from lmd.capabilities import render_capabilities
from tests.support.builders import box_object, layout_data
from tests.support.service import service_settings

KEYS = ["key-a", "key-b"]
SMALL = {"width": 64, "height": 64, "steps": 3}


@pytest.fixture(scope="module")
def app_settings(private_redis, tmp_path_factory):
    return service_settings(private_redis.url, tmp_path_factory.mktemp("data"), api_keys=KEYS)


@pytest.fixture(scope="module")
def client(app_settings):
    with TestClient(create_app(app_settings)) as c:
        yield c


@pytest.fixture
def store(app_settings):
    s = Store.from_settings(app_settings)
    yield s
    for key in s.redis.scan_iter(match=s.worker_key("*")):
        s.redis.delete(key)


def as_(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_the_gallery_lists_the_callers_sessions_latest_first_paginated_and_no_one_elses(client):
    mine = [client.post("/plan", json={"prompt": f"a cat number {i}", **SMALL}, headers=as_("key-a")).json()
            for i in range(3)]
    curl = client.post("/generate", json={"layout": layout_data(box_object("ball")), **SMALL}, headers=as_("key-a")).json()
    theirs = client.post("/plan", json={"prompt": "a secret dog", **SMALL}, headers=as_("key-b")).json()
    # a new turn moves a session to the top
    client.post("/generate", json={"layout": layout_data(box_object("cat")), "session_id": mine[0]["session_id"], **SMALL},
                headers=as_("key-a"))

    first = client.get("/sessions", params={"limit": 3}, headers=as_("key-a")).json()
    ids = [s["session_id"] for s in first["sessions"]]
    assert ids == [mine[0]["session_id"], curl["session_id"], mine[2]["session_id"]]
    assert first["total"] == 4 and first["next_offset"] == 3
    top = first["sessions"][0]
    assert top["prompt"] == "a cat number 0" and top["total_turns"] == 2
    assert top["latest"]["turn"] == 2 and top["latest"]["state"] == "queued" and top["thumbnail_url"] is None
    rest = client.get("/sessions", params={"offset": 3, "limit": 3}, headers=as_("key-a")).json()
    assert [s["session_id"] for s in rest["sessions"]] == [mine[1]["session_id"]] and rest["next_offset"] is None

    other = client.get("/sessions", headers=as_("key-b")).json()
    assert [s["session_id"] for s in other["sessions"]] == [theirs["session_id"]] and other["total"] == 1
    assert theirs["session_id"] not in json.dumps(first) + json.dumps(rest)
    assert client.get("/sessions").status_code == 401
    assert client.get("/sessions", params={"limit": 101}, headers=as_("key-a")).status_code == 422


def test_an_expired_session_leaves_the_list(client, store):
    accepted = client.post("/plan", json={"prompt": "a short-lived cat", **SMALL}, headers=as_("key-b")).json()
    store.redis.delete(store.session_key(accepted["session_id"]))
    listed = client.get("/sessions", headers=as_("key-b")).json()
    assert accepted["session_id"] not in [s["session_id"] for s in listed["sessions"]]
    assert listed["total"] == len(listed["sessions"])


def test_the_openapi_states_the_list_and_its_limits(client):
    operation = client.get("/openapi.json").json()["paths"]["/sessions"]["get"]
    params = {p["name"]: p["schema"] for p in operation["parameters"]}
    assert operation["operationId"] == "list_sessions"
    assert params["limit"]["maximum"] == 100 and params["limit"]["minimum"] == 1 and params["offset"]["minimum"] == 0
    assert {"401", "422", "503"} <= set(operation["responses"])


def test_a_queued_job_says_no_worker_serves_its_queue(client, store, app_settings):
    planned = client.post("/plan", json={"prompt": "a cat", **SMALL}, headers=as_("key-a")).json()
    given = client.post("/generate", json={"layout": layout_data(box_object("cat")), **SMALL}, headers=as_("key-a")).json()
    assert "no plan worker is running" in client.get(planned["status_url"], headers=as_("key-a")).json()["notice"]
    assert "no render worker is running" in client.get(given["status_url"], headers=as_("key-a")).json()["notice"]
    with client.stream("GET", f"{given['status_url']}/events", headers=as_("key-a")) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                assert "no render worker is running" in json.loads(line[5:])["notice"]
                break
    store.register_worker("test-render", ["render"], ttl_s=30, capabilities=render_capabilities(app_settings).model_dump())
    assert client.get(given["status_url"], headers=as_("key-a")).json()["notice"] is None
    assert "no plan worker" in client.get(planned["status_url"], headers=as_("key-a")).json()["notice"]


def test_limits_say_what_the_render_workers_can_run(client, store, app_settings, tmp_path):
    limits = client.get("/limits").json()
    assert limits["render"] is None and limits["render_workers"] == 0
    assert limits["conditionings"] == ["clip", "ella", "gluenet"] and limits["default_guidance_scale"] == 7.5

    model = tmp_path / "my-gligen-model"
    (model / "unet").mkdir(parents=True)
    (model / "unet" / "config.json").write_text(json.dumps({"attention_type": "gated"}))
    gligen = render_capabilities(app_settings.model_copy(update={"sd_model": str(model)}))
    plain = render_capabilities(app_settings.model_copy(update={"sd_model": str(tmp_path / "missing")}))
    assert gligen.variants == ["lmd", "sd", "lmd_plus"] and plain.variants == ["lmd", "sd"]
    assert gligen.model == "my-gligen-model"  # a local directory by its name: no path reaches a client
    assert plain.conditionings == ["clip"] and plain.refiner is False

    store.register_worker("render-1", ["render"], ttl_s=30, capabilities=gligen.model_dump())
    assert client.get("/limits").json()["render"]["variants"] == ["lmd", "sd", "lmd_plus"]
    store.register_worker("render-2", ["render"], ttl_s=30, capabilities=plain.model_dump())
    limits = client.get("/limits").json()
    assert limits["render_workers"] == 2 and limits["render"]["variants"] == ["lmd", "sd"]  # what any of them runs
    assert limits["render"]["scheduler"] == "DDIMScheduler"


def test_an_empty_layout_is_accepted_and_named_by_its_background(client):
    response = client.post("/generate", json={"layout": {"objects": [], "background": "an empty beach"}, **SMALL},
                           headers=as_("key-a"))
    assert response.status_code == 202, response.text
    job = client.get(response.json()["status_url"], headers=as_("key-a")).json()
    assert job["prompt"] == "an empty beach" and job["layout"]["objects"] == []


def _succeeded(store: Store, session: SessionRecord, kind: str, text: str, layout: Layout, given: bool) -> SessionRecord:
    now = utcnow()
    job = JobRecord(job_id=new_id(), session_id=session.session_id, kind=kind, prompt=text, layout=layout,
                    layout_given=given, seed=1, created_at=now, updated_at=now)
    created, _ = store.create_job(job, session)
    store.redis.set(store.job_key(created.job_id), created.model_copy(update={"state": "succeeded"}).model_dump_json())
    return store.get_session(session.session_id)


def test_a_revision_starts_from_the_layout_the_user_rendered(store, fake_llm):
    planned = Layout.model_validate(layout_data(box_object("cat", box=[0.1, 0.1, 0.4, 0.4]), box_object("dog", "a dog"),
                                                negative="birds"))
    edited = Layout.model_validate(layout_data(box_object("cat", "a black cat", box=[0.5, 0.5, 0.9, 0.9]),
                                               box_object("dog", "a dog"), negative="birds, rain"))
    now = utcnow()
    session = SessionRecord(session_id=new_id(), seed=1, created_at=now, updated_at=now)
    session = _succeeded(store, session, "plan", "a cat and a dog", planned, given=False)
    session = _succeeded(store, session, "generate", "a cat and a dog", edited, given=True)
    history = store.conversation(session.session_id, before_turn=3)
    assert history == [("a cat and a dog", edited)]  # the hand edit, not the plan; the prompt is not an instruction

    dog = edited.objects[1]
    fake_llm.enqueue(json.dumps({"objects": [{"id": "kitten", "phrase": "a kitten", "box": [300, 300, 100, 100]},
                                             {"id": "dog", "phrase": "a big dog", "box": list(dog.box_xywh())}],
                                 "background": "a room", "negative": "birds, rain"}))
    revised = Planner(fake_llm.config()).revise([Turn(text=t, layout=lay) for t, lay in history],
                                                "replace the cat with a kitten")
    messages = fake_llm.requests[0].messages
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert json.loads(messages[2]["content"])["negative"] == "birds, rain"
    assert messages[3]["content"] == "Instruction: replace the cat with a kitten"
    assert [o.id for o in revised.objects] == ["dog", "kitten"]
    assert [(w.tag, w.text) for w in revised.warnings] == [
        ("removed", "'a black cat' (cat) is not in the revision"), ("renamed", "dog: 'a dog' became 'a big dog'")]
