// Validates custom resources with the validators of the @kubernetes-models packages (generated
// from Karpenter's v1 API types and from the Prometheus Operator's CRDs).
// Usage: node validate-crds.mjs NODE_MODULES_DIR < [{"id": ..., "doc": {...}}, ...]
// Prints [{"id", "ok", "error"}] as JSON.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const modules = process.argv[2];
const models = {
  "karpenter.sh/v1/NodePool": "@kubernetes-models/karpenter/karpenter.sh/v1/NodePool.js",
  "karpenter.k8s.aws/v1/EC2NodeClass": "@kubernetes-models/karpenter/karpenter.k8s.aws/v1/EC2NodeClass.js",
  "monitoring.coreos.com/v1/ServiceMonitor": "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor.js",
};
const input = JSON.parse(readFileSync(0, "utf8"));
const out = [];
for (const { id, doc } of input) {
  const key = `${doc.apiVersion}/${doc.kind}`;
  if (!models[key]) {
    out.push({ id, ok: false, error: `no validator for ${key}` });
    continue;
  }
  const mod = await import(pathToFileURL(join(modules, models[key])).href);
  const Model = mod[doc.kind];
  try {
    new Model(doc).validate();
    out.push({ id, ok: true });
  } catch (e) {
    out.push({ id, ok: false, error: String(e.message || e) });
  }
}
process.stdout.write(JSON.stringify(out));
