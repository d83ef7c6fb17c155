//! Running a module with the reference interpreter behind the runtime's model interface.

use std::collections::HashMap;

use wcc_ir::interp::{Interpreter, Tensor, WeightLoader};
use wcc_ir::{DType, Module};
use wcc_runtime::decode::{BeamDecoder, Decoder};
use wcc_runtime::transcribe::WhisperModel;

/// An interpreted Whisper model. Values cross between graphs by name: decoder inputs are
/// fed from the encoder outputs of the same name, and each decoder output `X.next` becomes
/// input `X` of the next step (the self-attention caches).
pub struct InterpretedModel<'m> {
    interp: Interpreter<'m>,
    input_shape: (usize, usize),
    encoder_out: HashMap<String, Tensor>,
    state: HashMap<String, Tensor>,
    logits: Vec<f32>,
}

impl<'m> InterpretedModel<'m> {
    pub fn new(module: &'m Module, weights: &dyn WeightLoader) -> Result<Self, String> {
        let enc = module.graph("encoder").ok_or("the module has no `encoder` graph")?;
        module.graph("decoder_step").ok_or("the module has no `decoder_step` graph")?;
        let mel = enc.ty(*enc.inputs.first().ok_or("the encoder has no input")?);
        if mel.rank() != 2 {
            return Err(format!("the encoder input is {mel}, expected [n_mels, frames]"));
        }
        let input_shape = (mel.shape[0], mel.shape[1]);
        let interp = Interpreter::new(module, weights).map_err(|e| e.to_string())?;
        Ok(InterpretedModel { interp, input_shape, encoder_out: HashMap::new(), state: HashMap::new(), logits: vec![] })
    }

    /// The encoder's outputs after the last [`WhisperModel::encode`], by name.
    pub fn encoder_outputs(&self) -> &HashMap<String, Tensor> {
        &self.encoder_out
    }
}

impl WhisperModel for InterpretedModel<'_> {
    /// The interpreter runs the graphs without the alignment output (`--word-timestamps`
    /// needs a compiled model).
    fn alignment(&self, _out: &mut Vec<f32>) -> Option<(usize, usize)> {
        None
    }

    fn input_shape(&self) -> (usize, usize) {
        self.input_shape
    }

    fn encode(&mut self, mel: &[f32]) -> Result<(), String> {
        let module = self.interp.module();
        let enc = module.graph("encoder").expect("checked in new");
        let input = Tensor::f32([self.input_shape.0, self.input_shape.1], mel.to_vec());
        let outs = self.interp.run("encoder", &[input]).map_err(|e| e.to_string())?;
        self.encoder_out = enc.outputs.iter().map(|&o| enc.value(o).name.clone()).zip(outs).collect();
        // A new window starts a new sequence: empty caches.
        self.state.clear();
        Ok(())
    }
}

impl InterpretedModel<'_> {
    /// Runs decoder graph `graph` with the inputs `fed` by name, the others from the encoder
    /// or the state; keeps the `.next` outputs as the state and returns output `logits`.
    fn run_step(&mut self, graph: &str, fed: Vec<(String, Tensor)>, logits: &str) -> Result<&[f32], String> {
        let module = self.interp.module();
        let dec = module.graph(graph).ok_or_else(|| format!("the module has no `{graph}` graph"))?;
        let mut fed: HashMap<String, Tensor> = fed.into_iter().collect();
        let mut inputs = Vec::with_capacity(dec.inputs.len());
        for &i in &dec.inputs {
            let v = dec.value(i);
            let name = v.name.as_str();
            let t = match (fed.remove(name), self.encoder_out.get(name), self.state.remove(name)) {
                (Some(t), _, _) => t,
                (None, Some(t), _) => t.clone(),
                (None, None, Some(t)) => t,
                (None, None, None) if v.ty.dtype == DType::F32 => Tensor::zeros(v.ty.shape.clone()),
                (None, None, None) => return Err(format!("nothing feeds decoder input %{name}")),
            };
            inputs.push(t);
        }
        let outs = self.interp.run(graph, &inputs).map_err(|e| e.to_string())?;
        let mut found = None;
        for (&o, t) in dec.outputs.iter().zip(outs) {
            let name = &dec.value(o).name;
            match name.strip_suffix(".next") {
                Some(state) => {
                    self.state.insert(state.to_string(), t);
                }
                None if name == logits => found = Some(t.into_f32().map_err(|e| e.to_string())?),
                None => {}
            }
        }
        self.logits = found.ok_or_else(|| format!("`{graph}` has no `{logits}` output"))?;
        Ok(&self.logits)
    }
}

impl Decoder for InterpretedModel<'_> {
    fn step(&mut self, token: u32, position: usize) -> Result<&[f32], String> {
        let fed = vec![
            ("tokens".to_string(), Tensor::i32([1], vec![token as i32])),
            ("position".to_string(), Tensor::i32([1], vec![position as i32])),
        ];
        self.run_step("decoder_step", fed, "logits")
    }

    fn prefill(&mut self, tokens: &[u32], start: usize) -> Result<(), String> {
        wcc_runtime::decode::prefill_by_steps(self, tokens, start)
    }
}

impl BeamDecoder for InterpretedModel<'_> {
    fn beam_widths(&self) -> Vec<usize> {
        let module = self.interp.module();
        module.graphs.iter().filter_map(|g| g.name.strip_prefix("decoder_beam")?.parse().ok()).collect()
    }

    fn beam_step(&mut self, tokens: &[u32], origin: &[u32], position: usize) -> Result<&[f32], String> {
        let n = tokens.len();
        if !self.beam_widths().contains(&n) {
            return Err(format!("this module has no beam of {n}; it has {:?}", self.beam_widths()));
        }
        let ids = |v: &[u32]| Tensor::i32([v.len()], v.iter().map(|&x| x as i32).collect());
        let fed = vec![
            (format!("beam{n}.tokens"), ids(tokens)),
            (format!("beam{n}.position"), Tensor::i32([1], vec![position as i32])),
            (format!("beam{n}.origin"), ids(origin)),
        ];
        self.run_step(&format!("decoder_beam{n}"), fed, &format!("beam{n}.logits"))
    }

    fn beam_prefill(&mut self, width: usize, prompt: &[u32]) -> Result<(), String> {
        // The interpreter runs `wcc transcribe --interpret` (built without prompt blocks).
        wcc_runtime::decode::beam_prefill_by_steps(self, width, prompt)
    }
}
