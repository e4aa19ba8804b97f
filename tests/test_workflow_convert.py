"""magicvideo.host.workflow_to_prompt: UI-format workflows to API prompts, without a server."""

import pytest

from magicvideo.host import PromptError, describe_rejection, execution_error, workflow_to_prompt

OBJECT_INFO = {
    "Loader": {"input": {"required": {"name": [["a.bin", "b.bin"]]}}},
    "Sampler": {"input": {"required": {
        "model": ["MODEL"],
        "seed": ["INT", {"default": 0}],
        "steps": ["INT", {"default": 20}],
        "sampler": [["euler", "ddim"]],
    }, "optional": {"strength": ["FLOAT", {"default": 1.0}], "extra": ["LATENT"]}}},
    "Noise": {"input": {"required": {"noise_seed": ["INT", {}], "mode": [["a", "b"], {"control_after_generate": True}]}}},
    "Save": {"input": {"required": {"images": ["IMAGE"], "prefix": ["STRING", {}]},
                       "hidden": {"prompt": "PROMPT"}}},
    "Scale": {"input": {"required": {"image": ["IMAGE"], "width": ["INT", {}]}}},
    "Passthrough": {"input": {"required": {"model": ["MODEL"], "image": ["IMAGE"]}}},
    "LoadImage": {"input": {"required": {"image": [["a.png", "b.png"], {"image_upload": True}]}}},
}


def node(id, type, values=None, inputs=(), mode=0, outputs=()):
    n = {"id": id, "type": type, "mode": mode, "inputs": list(inputs), "outputs": list(outputs)}
    if values is not None:
        n["widgets_values"] = values
    return n


def slot(name, link, type="*", widget=None):
    s = {"name": name, "type": type, "link": link}
    if widget:
        s["widget"] = {"name": widget}
    return s


def test_widgets_map_in_order_and_seed_controls_are_skipped():
    workflow = {"nodes": [
        node(1, "Loader", ["b.bin"]),
        node(2, "Sampler", [42, "randomize", 7, "ddim", 0.5], [slot("model", 1, "MODEL")]),
        node(3, "Noise", [5, "fixed", "b", "increment"]),
    ], "links": [[1, 1, 0, 2, 0, "MODEL"]]}
    assert workflow_to_prompt(workflow, OBJECT_INFO) == {
        "1": {"class_type": "Loader", "inputs": {"name": "b.bin"}},
        "2": {"class_type": "Sampler", "inputs": {"model": ["1", 0], "seed": 42, "steps": 7, "sampler": "ddim",
                                                  "strength": 0.5}},
        "3": {"class_type": "Noise", "inputs": {"noise_seed": 5, "mode": "b"}},
    }


def test_an_image_upload_widget_is_sent_as_the_ui_sends_it():
    """Core Load Image saves its upload button's value after the file name; the UI sends it as
    "upload", and so must the runner, or the two prompts of one workflow differ."""
    workflow = {"nodes": [node(1, "LoadImage", ["b.png", "image"])], "links": []}
    assert workflow_to_prompt(workflow, OBJECT_INFO) == {
        "1": {"class_type": "LoadImage", "inputs": {"image": "b.png", "upload": "image"}}}


def test_a_widget_converted_to_an_input_takes_the_link_and_keeps_its_slot():
    workflow = {"nodes": [
        node(1, "Noise", [9, "fixed", "a"]),
        node(2, "Scale", [64], [slot("image", None, "IMAGE"), slot("width", 5, "INT", widget="width")]),
        node(3, "Sampler", [1, "fixed", 3, "euler", 1.0], [slot("model", None), slot("seed", 6, "INT", widget="seed")]),
    ], "links": [[5, 1, 0, 2, 1, "INT"], [6, 1, 0, 3, 1, "INT"]]}
    prompt = workflow_to_prompt(workflow, OBJECT_INFO)
    assert prompt["2"]["inputs"] == {"width": ["1", 0]}
    assert prompt["3"]["inputs"] == {"seed": ["1", 0], "steps": 3, "sampler": "euler", "strength": 1.0}


def test_reroutes_bypass_mute_notes_and_primitives():
    workflow = {"nodes": [
        node(1, "Loader", ["a.bin"]),
        node(2, "Reroute", [], [slot("", 1, "*")]),
        node(3, "Passthrough", [], [slot("model", None, "MODEL"), slot("image", 3, "IMAGE")], mode=4),  # bypassed
        node(4, "Scale", [32], [slot("image", 4, "IMAGE"), slot("width", 7, "INT", widget="width")]),
        node(5, "Save", ["out"], [slot("images", 5, "IMAGE")]),
        node(6, "Note", ["a note"]),
        node(7, "PrimitiveNode", [128, "fixed"]),
        node(8, "Save", ["muted"], [slot("images", 6, "IMAGE")], mode=2),
        node(9, "Scale", [16], [slot("image", None, "IMAGE")]),
    ], "links": [
        [1, 9, 0, 2, 0, "IMAGE"], [3, 2, 0, 3, 1, "IMAGE"], [4, 3, 1, 4, 0, "IMAGE"], [5, 4, 0, 5, 0, "IMAGE"],
        [6, 4, 0, 8, 0, "IMAGE"], [7, 7, 0, 4, 1, "INT"],
    ]}
    prompt = workflow_to_prompt(workflow, OBJECT_INFO)
    assert set(prompt) == {"1", "4", "5", "9"}
    assert prompt["4"]["inputs"] == {"image": ["9", 0], "width": 32}  # through bypass and reroute; primitive value kept
    assert prompt["5"]["inputs"] == {"images": ["4", 0], "prefix": "out"}


def test_missing_node_types_are_named():
    workflow = {"nodes": [node(1, "Loader", ["a.bin"]), node(2, "SomePackNode", []), node(3, "Other", [])], "links": []}
    with pytest.raises(PromptError, match="Other, SomePackNode"):
        workflow_to_prompt(workflow, OBJECT_INFO)


def test_host_messages_are_summarised():
    rejection = {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                           "details": "", "extra_info": {}},
                 "node_errors": {"2": {"class_type": "Save", "errors": [
                     {"message": "Value not in list", "details": "format: 'avi' not in ['mp4']"}]}}}
    assert describe_rejection(rejection) == ("Prompt outputs failed validation\n"
                                             "Save (node 2): Value not in list: format: 'avi' not in ['mp4']")
    failed = {"status": {"status_str": "error", "messages": [
        ["execution_start", {}],
        ["execution_error", {"node_type": "Save", "node_id": "2", "exception_type": "ValueError",
                             "exception_message": "expected fps above 0, found 0"}]]}}
    assert execution_error(failed) == "Save (node 2): ValueError: expected fps above 0, found 0"
    assert execution_error({"status": {"status_str": "success", "messages": []}}) is None
