// The ESRGAN peer of benchmarks/peer_esrgan.py: @upscalerjs/esrgan-thick (RRDN, DIV2K-trained; weights in the
// npm package) on TF.js with the WebAssembly backend, one thread.
//
//   node run.js SCALE INPUT OUTPUT
//
// INPUT: a JSON header line {"shapes": [[h, w], ...]} then the images' RGB bytes (uint8, row-major, h*w*3 each).
// OUTPUT: the same layout for the upscaled images (h*SCALE, w*SCALE), plus "seconds" per image in the header.
// The model takes and returns values in 0..1 (its definition's inputRange/outputRange); outputs are clipped and
// rounded to 8 bits, as a PNG would store them.

const fs = require("fs");
const path = require("path");
const tf = require("@tensorflow/tfjs");
const wasm = require("@tensorflow/tfjs-backend-wasm");

async function load(scale) {
  const definition = require(`@upscalerjs/esrgan-thick/${scale}x`); // the model definition (CommonJS export)
  definition.setup(tf); // registers the model's custom layers (MultiplyBeta, PixelShuffle)
  const root = path.join(__dirname, "node_modules", "@upscalerjs", "esrgan-thick");
  const folder = path.join(root, "models", `x${scale}`);
  const model = JSON.parse(fs.readFileSync(path.join(folder, "model.json")));
  const specs = [];
  const buffers = [];
  for (const group of model.weightsManifest) {
    specs.push(...group.weights);
    for (const file of group.paths) buffers.push(fs.readFileSync(path.join(folder, file)));
  }
  const joined = Buffer.concat(buffers);
  const weightData = joined.buffer.slice(joined.byteOffset, joined.byteOffset + joined.byteLength);
  return tf.loadLayersModel({
    load: async () => ({
      modelTopology: model.modelTopology,
      format: model.format,
      generatedBy: model.generatedBy,
      convertedBy: model.convertedBy,
      weightSpecs: specs,
      weightData,
    }),
  });
}

async function main() {
  const [scaleText, input, output] = process.argv.slice(2);
  const scale = Number(scaleText);
  wasm.setWasmPaths(path.join(__dirname, "node_modules", "@tensorflow", "tfjs-backend-wasm", "dist") + "/");
  wasm.setThreadsCount(1);
  await tf.setBackend("wasm");
  await tf.ready();
  const model = await load(scale);
  const data = fs.readFileSync(input);
  const newline = data.indexOf(10);
  const header = JSON.parse(data.subarray(0, newline).toString());
  let offset = newline + 1;
  const outputs = [];
  const seconds = [];
  const shapes = [];
  for (const [h, w] of header.shapes) {
    const pixels = new Uint8Array(data.buffer, data.byteOffset + offset, h * w * 3);
    offset += h * w * 3;
    const started = process.hrtime.bigint();
    const result = tf.tidy(() => {
      const x = tf.tensor4d(Float32Array.from(pixels, (v) => v / 255), [1, h, w, 3]);
      return model.predict(x).clipByValue(0, 1).mul(255).round().cast("int32");
    });
    const values = await result.data();
    result.dispose();
    seconds.push(Number(process.hrtime.bigint() - started) / 1e9);
    outputs.push(Buffer.from(Uint8Array.from(values)));
    shapes.push([h * scale, w * scale]);
  }
  fs.writeFileSync(output, Buffer.concat([Buffer.from(JSON.stringify({ shapes, seconds }) + "\n"), ...outputs]));
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
