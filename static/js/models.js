// The model picker's data: categories from /api/models/categories, or one "Models" group from
// /api/models when the gateway has no categories endpoint.

import { apiFetch } from "./auth.js";

/** {groups: [{label, models: [model]}], models: Map(id -> model), note} */
export async function loadCatalogue() {
  const response = await apiFetch("api/models/categories", { headers: { accept: "application/json" } });
  if (response.ok) return fromCategories(await response.json());
  if (response.status !== 404) throw new Error(`the model list failed (HTTP ${response.status})`);
  const plain = await apiFetch("api/models", { headers: { accept: "application/json" } });
  if (!plain.ok) throw new Error(`the model list failed (HTTP ${plain.status})`);
  return fromList(await plain.json());
}

function asText(value) {
  return typeof value === "string" ? value : null;
}

function fromCategories(body) {
  const models = new Map();
  for (const m of Array.isArray(body.models) ? body.models : []) {
    const id = asText(m?.id);
    if (!id) continue;
    models.set(id, {
      id,
      provider: asText(m.provider),
      display_name: asText(m.display_name),
      family: asText(m.family),
      tier: asText(m.tier),
      context_window: Number.isFinite(m.context_window) ? m.context_window : null,
      categories: Array.isArray(m.categories) ? m.categories.filter((c) => typeof c === "string") : [],
    });
  }
  const groups = [];
  for (const category of Array.isArray(body.categories) ? body.categories : []) {
    const ids = (Array.isArray(category?.models) ? category.models : []).filter((id) => models.has(id));
    if (ids.length) groups.push({ id: asText(category.id), label: asText(category.label) || asText(category.id) || "Other", models: ids.map((id) => models.get(id)) });
  }
  const grouped = new Set(groups.flatMap((g) => g.models.map((m) => m.id)));
  const rest = [...models.values()].filter((m) => !grouped.has(m.id));
  if (rest.length) groups.push({ id: "other", label: "Other", models: rest });
  const notes = [];
  if (body.degraded) notes.push("categories are approximate (classifier unavailable)");
  if (Array.isArray(body.unavailable) && body.unavailable.length) notes.push(`not listed: ${body.unavailable.filter((p) => typeof p === "string").join(", ")}`);
  return { groups, models, note: notes.join("; ") };
}

function fromList(body) {
  const models = new Map();
  for (const card of Array.isArray(body.data) ? body.data : []) {
    const id = asText(card?.id);
    if (id) models.set(id, { id, provider: asText(card.owned_by), display_name: null, family: null, tier: null, context_window: null, categories: [] });
  }
  const note = Array.isArray(body.unavailable) && body.unavailable.length ? `not listed: ${body.unavailable.join(", ")}` : "";
  return { groups: [{ id: "models", label: "Models", models: [...models.values()] }], models, note };
}

/** A one-line description of a model's attributes, as text. */
export function describe(model) {
  if (!model) return "";
  const parts = [];
  if (model.provider) parts.push(model.provider);
  if (model.family) parts.push(model.family);
  if (model.tier) parts.push(`${model.tier} tier`);
  if (model.context_window) parts.push(`${formatTokens(model.context_window)} context`);
  if (model.categories.length) parts.push(model.categories.join(", "));
  return parts.join(" · ");
}

function formatTokens(n) {
  return n >= 1000 ? `${Math.round(n / 1000)}k` : String(n);
}
