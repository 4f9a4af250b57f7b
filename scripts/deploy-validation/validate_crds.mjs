// Validates the custom resources of deploy/ (KEDA, Prometheus Operator) against
// their schemas as published in kubernetes-models, and parses every PromQL
// expression of a PrometheusRule with Prometheus' own PromQL grammar.
//
// Input: a JSON file holding [{source, object}, ...]. Prints one line per
// object; exits 1 when any fails. Run by deploy_checks.py, from the tools
// folder where `npm ci` installed package.json's dependencies.
import { readFileSync } from "node:fs";

import { ScaledObject, TriggerAuthentication } from "@kubernetes-models/keda/keda.sh/v1alpha1";
import { PodMonitor, PrometheusRule, ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";
import { parser as promql } from "@prometheus-io/lezer-promql";

const models = {
  "keda.sh/v1alpha1": { ScaledObject, TriggerAuthentication },
  "monitoring.coreos.com/v1": { PodMonitor, PrometheusRule, ServiceMonitor },
};

/** Syntax errors of one PromQL expression (lezer recovers, marking error nodes). */
function promqlErrors(expr) {
  const errors = [];
  promql.parse(expr).iterate({
    enter(node) {
      if (node.type.isError) {
        errors.push(`syntax error at offset ${node.from}: \`${expr.slice(Math.max(0, node.from - 20), node.to + 20).trim()}\``);
      }
    },
  });
  return errors;
}

function check({ object }) {
  const Model = models[object.apiVersion]?.[object.kind];
  if (!Model) {
    return [`no schema for ${object.apiVersion} ${object.kind}: add its model to validate_crds.mjs`];
  }
  const errors = [];
  try {
    new Model(object).validate();
  } catch (error) {
    errors.push(error.message);
  }
  if (object.kind === "PrometheusRule") {
    for (const group of object.spec?.groups ?? []) {
      for (const rule of group.rules ?? []) {
        const name = rule.alert ?? rule.record;
        for (const message of promqlErrors(String(rule.expr))) {
          errors.push(`${group.name}/${name}: ${message}`);
        }
      }
    }
  }
  return errors;
}

const items = JSON.parse(readFileSync(process.argv[2], "utf8"));
let failed = 0;
for (const item of items) {
  const what = `${item.source}: ${item.object.kind}/${item.object.metadata?.name}`;
  const errors = check(item);
  if (errors.length === 0) {
    console.log(`ok     ${what} (kubernetes-models)`);
  } else {
    failed += 1;
    for (const error of errors) {
      console.log(`FAILED ${what}: ${error}`);
    }
  }
}
process.exit(failed === 0 ? 0 : 1);
