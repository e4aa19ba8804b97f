// MagicVideo web extension for the legacy ComfyUI frontend (the one served by ComfyUI
// itself until mid 2024). Newer frontends (they set window.__COMFYUI_FRONTEND_VERSION__)
// preview videos, upload them and read the prompt/workflow out of dropped mp4/webm files on
// their own, so there this file does nothing.
//
// - Save Video and Save Long Video: show the written mp4/webm in the node (gif/webp the host shows itself),
//   with the encoder's notes (e.g. an odd size padded for H.264).
// - Load Video: an upload button and a preview of the chosen video.
// - Dropping a video written by Save Video on the canvas restores its workflow: mp4 keeps it
//   in moov/udta/meta (keys + ilst), webm in Matroska tags, gif in a comment extension.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const SAVES = ["MagicVideoSaveVideo", "MagicVideoSaveLongVideo"];
const LOAD = "MagicVideoLoadVideo";
const LEGACY = !window.__COMFYUI_FRONTEND_VERSION__;
const PREVIEW = "magicvideo_preview";

function viewUrl({ filename, subfolder = "", type = "output" }) {
	const query = new URLSearchParams({ filename, subfolder, type });
	return api.apiURL(`/view?${query}${app.getRandParam?.() ?? ""}`);
}

const isStill = (name) => /\.(gif|webp)$/i.test(name);

// One DOM widget per node holding a <video> (or <img> for gif/webp) and a line of notes.
function preview(node) {
	let widget = node.widgets?.find((w) => w.name === PREVIEW);
	if (!widget) {
		const el = document.createElement("div");
		el.className = "magicvideo-preview";
		el.style.cssText = "display:flex;flex-direction:column;gap:2px;overflow:hidden";
		widget = node.addDOMWidget(PREVIEW, "preview", el, { serialize: false, hideOnZoom: false, getHeight: () => 220 });
		widget.serializeValue = () => undefined;
	}
	return widget;
}

function showMedia(node, url, name, notes = []) {
	const widget = preview(node);
	const el = widget.element;
	el.replaceChildren();
	let media;
	if (isStill(name)) {
		media = document.createElement("img");
	} else {
		media = document.createElement("video");
		Object.assign(media, { controls: true, autoplay: true, loop: true, muted: true, playsInline: true });
	}
	media.src = url;
	media.dataset.filename = name;
	media.style.cssText = "width:100%;flex:1;min-height:0;object-fit:contain";
	el.append(media);
	for (const note of notes) {
		const line = document.createElement("div");
		line.className = "magicvideo-note";
		line.textContent = note;
		line.style.cssText = "font-size:11px;color:var(--descrip-text,#999)";
		el.append(line);
	}
	const [w, h] = node.computeSize();
	node.setSize([Math.max(node.size[0], w, 256), Math.max(node.size[1], h)]);
	app.graph.setDirtyCanvas(true, true);
}

function setUpSaveVideo(nodeType) {
	const onExecuted = nodeType.prototype.onExecuted;
	nodeType.prototype.onExecuted = function (output) {
		onExecuted?.apply(this, arguments);
		const video = (output?.images ?? []).find((f) => String(f.format ?? "").startsWith("video/"));
		if (video) showMedia(this, viewUrl(video), video.filename, video.notes ?? []);
	};
}

function setUpLoadVideo(nodeType) {
	const onNodeCreated = nodeType.prototype.onNodeCreated;
	nodeType.prototype.onNodeCreated = function () {
		const result = onNodeCreated?.apply(this, arguments);
		const node = this;
		const choice = node.widgets.find((w) => w.name === "video");
		const show = () => {
			if (!choice.value) return;
			const slash = choice.value.lastIndexOf("/");
			const file = { filename: choice.value.slice(slash + 1), subfolder: slash > 0 ? choice.value.slice(0, slash) : "", type: "input" };
			showMedia(node, viewUrl(file), file.filename);
		};
		const picker = Object.assign(document.createElement("input"), { type: "file", accept: "video/*,.mkv,.gif,.webp", hidden: true });
		document.body.append(picker);
		picker.onchange = async () => {
			if (!picker.files.length) return;
			const body = new FormData();
			body.append("image", picker.files[0]);
			const resp = await api.fetchApi("/upload/image", { method: "POST", body });
			if (resp.status !== 200) return alert(`Upload failed: ${resp.status} ${resp.statusText}`);
			const data = await resp.json();
			const name = data.subfolder ? `${data.subfolder}/${data.name}` : data.name;
			if (!choice.options.values.includes(name)) choice.options.values.push(name);
			choice.value = name;
			show();
		};
		const upload = node.addWidget("button", "choose video to upload", null, () => picker.click(), { serialize: false });
		upload.serializeValue = () => undefined;
		const callback = choice.callback;
		choice.callback = function () {
			show();
			return callback?.apply(this, arguments);
		};
		const onRemoved = node.onRemoved;
		node.onRemoved = function () {
			picker.remove();
			return onRemoved?.apply(this, arguments);
		};
		requestAnimationFrame(show);
		return result;
	};
}

// ---------------------------------------------------------------- metadata in dropped files

const text = (bytes) => new TextDecoder().decode(bytes);
const u32 = (d, p) => ((d[p] << 24) | (d[p + 1] << 16) | (d[p + 2] << 8) | d[p + 3]) >>> 0;
const fourcc = (d, p) => String.fromCharCode(d[p], d[p + 1], d[p + 2], d[p + 3]);

// ISO BMFF boxes in [start, end): [{type, start (content), end}]
function boxes(d, start, end) {
	const out = [];
	for (let p = start; p + 8 <= end; ) {
		let size = u32(d, p);
		let header = 8;
		if (size === 1) {
			size = u32(d, p + 8) * 2 ** 32 + u32(d, p + 12);
			header = 16;
		} else if (size === 0) {
			size = end - p;
		}
		if (size < header || p + size > end) break;
		out.push({ type: fourcc(d, p + 4), start: p + header, end: p + size });
		p += size;
	}
	return out;
}

function mp4Metadata(d) {
	const child = (box, type) => box && boxes(d, box.start, box.end).find((b) => b.type === type);
	const moov = boxes(d, 0, d.length).find((b) => b.type === "moov");
	const meta = child(child(moov, "udta"), "meta");
	if (!meta) return {};
	// mp4 writes meta as a full box (version + flags first), QuickTime does not: try both
	const kids = [4, 0].map((skip) => boxes(d, meta.start + skip, meta.end)).find((k) => k.some((b) => b.type === "keys")) ?? [];
	const keysBox = kids.find((b) => b.type === "keys");
	const ilst = kids.find((b) => b.type === "ilst");
	if (!keysBox || !ilst) return {};
	const keys = [];
	for (let p = keysBox.start + 8, n = u32(d, keysBox.start + 4); n > 0 && p + 8 <= keysBox.end; n--) {
		const size = u32(d, p);
		keys.push(text(d.subarray(p + 8, p + size)));
		p += size;
	}
	const found = {};
	for (const item of boxes(d, ilst.start, ilst.end)) {
		const key = keys[u32(d, item.start - 4) - 1]; // an item's type is its 1-based key index
		const data = boxes(d, item.start, item.end).find((b) => b.type === "data");
		if (key && data) found[key.toLowerCase()] = text(d.subarray(data.start + 8, data.end));
	}
	return found;
}

// EBML variable-length integers: ids keep their marker bit, sizes drop it.
function vint(d, p, keepMarker) {
	const first = d[p];
	let length = 1;
	while (length <= 8 && !(first & (0x80 >> (length - 1)))) length++;
	if (length > 8) return null;
	let value = keepMarker ? first : first & (0xff >> length);
	let allOnes = value === (0xff >> length);
	for (let i = 1; i < length; i++) {
		value = value * 256 + d[p + i];
		allOnes = allOnes && d[p + i] === 0xff;
	}
	return { value, length, unknown: !keepMarker && allOnes };
}

function ebml(d, start, end) {
	const out = [];
	for (let p = start; p < end; ) {
		const id = vint(d, p, true);
		const size = id && vint(d, p + id.length, false);
		if (!size) break;
		const content = p + id.length + size.length;
		const stop = size.unknown ? end : Math.min(content + size.value, end);
		out.push({ id: id.value, start: content, end: stop });
		p = stop;
	}
	return out;
}

function webmMetadata(d) {
	const ID = { SEGMENT: 0x18538067, TAGS: 0x1254c367, TAG: 0x7373, SIMPLE: 0x67c8, NAME: 0x45a3, STRING: 0x4487 };
	const found = {};
	for (const segment of ebml(d, 0, d.length).filter((e) => e.id === ID.SEGMENT)) {
		for (const tags of ebml(d, segment.start, segment.end).filter((e) => e.id === ID.TAGS)) {
			for (const tag of ebml(d, tags.start, tags.end).filter((e) => e.id === ID.TAG)) {
				for (const simple of ebml(d, tag.start, tag.end).filter((e) => e.id === ID.SIMPLE)) {
					const parts = ebml(d, simple.start, simple.end);
					const name = parts.find((e) => e.id === ID.NAME);
					const value = parts.find((e) => e.id === ID.STRING);
					if (name && value) found[text(d.subarray(name.start, name.end)).toLowerCase()] = text(d.subarray(value.start, value.end));
				}
			}
		}
	}
	return found;
}

function gifMetadata(d) {
	let p = 13;
	if (d[10] & 0x80) p += 3 * 2 ** ((d[10] & 7) + 1); // global colour table
	const subBlocks = (q, sink) => {
		while (q < d.length && d[q]) {
			sink?.push(d.subarray(q + 1, q + 1 + d[q]));
			q += d[q] + 1;
		}
		return q + 1;
	};
	while (p < d.length) {
		if (d[p] === 0x21) {
			if (d[p + 1] === 0xfe) {
				const chunks = [];
				subBlocks(p + 2, chunks);
				try {
					const parsed = JSON.parse(text(new Uint8Array(chunks.flatMap((c) => [...c]))));
					return Object.fromEntries(Object.entries(parsed).map(([k, v]) => [k, JSON.stringify(v)]));
				} catch {
					return {};
				}
			}
			p = subBlocks(p + 2);
		} else if (d[p] === 0x2c) {
			let q = p + 10;
			if (d[p + 9] & 0x80) q += 3 * 2 ** ((d[p + 9] & 7) + 1); // local colour table
			p = subBlocks(q + 1); // skip the LZW code size, then the image data
		} else {
			break;
		}
	}
	return {};
}

function readerFor(file) {
	const name = file.name?.toLowerCase() ?? "";
	if (file.type === "video/mp4" || /\.(mp4|m4v|mov)$/.test(name)) return mp4Metadata;
	if (file.type === "video/webm" || /\.(webm|mkv)$/.test(name)) return webmMetadata;
	if (file.type === "image/gif" || name.endsWith(".gif")) return gifMetadata;
	return null;
}

async function restoreFromVideo(file) {
	const reader = readerFor(file);
	if (!reader) return false;
	let found = {};
	try {
		found = reader(new Uint8Array(await file.arrayBuffer()));
	} catch (error) {
		console.warn("MagicVideo: could not read metadata from", file.name, error);
	}
	if (found.workflow) {
		await app.loadGraphData(JSON.parse(found.workflow));
		return true;
	}
	if (found.prompt) {
		app.loadApiJson(JSON.parse(found.prompt));
		return true;
	}
	return false;
}

if (LEGACY) {
	app.registerExtension({
		name: "MagicVideo.Video",
		async setup() {
			const handleFile = app.handleFile.bind(app);
			app.handleFile = async function (file) {
				if (await restoreFromVideo(file)) return;
				return handleFile(file);
			};
		},
		async beforeRegisterNodeDef(nodeType, nodeData) {
			if (SAVES.includes(nodeData.name)) setUpSaveVideo(nodeType);
			if (nodeData.name === LOAD) setUpLoadVideo(nodeType);
		},
	});
}

export { mp4Metadata, webmMetadata, gifMetadata };
